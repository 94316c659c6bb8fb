# Baseline of the paper (Table 6): smooth L1 with beta = 1.0 on the RoI
# head's box regression. The RPN keeps MMDetection's L1Loss.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['balanced_l1_plugin'], allow_failed_imports=False)

model = dict(
    roi_head=dict(
        bbox_head=dict(
            loss_bbox=dict(
                _delete_=True, type='SmoothL1Loss', beta=1.0,
                loss_weight=1.0))))
