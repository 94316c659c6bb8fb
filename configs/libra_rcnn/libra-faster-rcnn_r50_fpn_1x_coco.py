# Libra R-CNN (balanced feature pyramid, IoU-balanced sampling, Balanced L1
# Loss) R50-FPN 1x: MMDetection's config with its BalancedL1Loss replaced by
# the plugin's (same values and gradients at beta = 1.0).
_base_ = 'mmdet::libra_rcnn/libra-faster-rcnn_r50_fpn_1x_coco.py'

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
