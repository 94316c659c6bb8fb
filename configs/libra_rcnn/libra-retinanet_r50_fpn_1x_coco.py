# Libra RetinaNet R50-FPN 1x (balanced feature pyramid, Balanced L1 Loss
# with beta = 0.11): MMDetection's config with the plugin's loss. At
# beta = 0.11 the plugin's loss is the paper's loss scaled to the threshold
# (gradient 0 at x = 0, continuous at beta); MMDetection's differs there.
_base_ = 'mmdet::libra_rcnn/libra-retinanet_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['balanced_l1_plugin'], allow_failed_imports=False)

model = dict(
    bbox_head=dict(
        loss_bbox=dict(
            _delete_=True,
            type='balanced_l1_plugin.BalancedL1Loss',
            alpha=0.5,
            gamma=1.5,
            beta=0.11,
            loss_weight=1.0)))
