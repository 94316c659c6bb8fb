# Table 6 of the paper, alpha = 0.2, gamma = 1.0: Faster R-CNN R50-FPN 1x with
# the plugin's Balanced L1 Loss on the RoI head (no BFP, random sampling).
_base_ = '../faster_rcnn/faster-rcnn_r50_fpn_balanced-l1_1x_coco.py'

custom_imports = dict(
    imports=['balanced_l1_plugin'], allow_failed_imports=False)

model = dict(
    roi_head=dict(bbox_head=dict(loss_bbox=dict(alpha=0.2, gamma=1.0))))
