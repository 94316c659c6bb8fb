# Faster R-CNN R50-FPN 1x with the plugin's Balanced L1 Loss on the RoI
# head's box regression, the paper's best setting (Table 6: alpha = 0.5,
# gamma = 1.5). Nothing else of Libra R-CNN (no BFP, random sampling).
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['balanced_l1_plugin'], allow_failed_imports=False)

model = dict(
    roi_head=dict(
        bbox_head=dict(
            loss_bbox=dict(
                _delete_=True,
                type='balanced_l1_plugin.BalancedL1Loss',
                alpha=0.5,
                gamma=1.5,
                beta=1.0,
                loss_weight=1.0))))
