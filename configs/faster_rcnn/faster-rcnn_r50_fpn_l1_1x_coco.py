# Baseline: Faster R-CNN R50-FPN 1x exactly as MMDetection trains it, with
# L1Loss on the RoI head's box regression (and on the RPN's).
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['balanced_l1_plugin'], allow_failed_imports=False)
