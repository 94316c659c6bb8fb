# Libra R-CNN R101-FPN 1x: MMDetection's config with the plugin's loss.
_base_ = 'mmdet::libra_rcnn/libra-faster-rcnn_r101_fpn_1x_coco.py'

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
