# Libra R-CNN R50-FPN 2x: the 1x model with MMDetection's 2x schedule
# (_base_/schedules/schedule_2x.py: 24 epochs, LR steps at 16 and 22).
# MMDetection ships no 2x Libra config.
_base_ = './libra-faster-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['balanced_l1_plugin'], allow_failed_imports=False)

train_cfg = dict(max_epochs=24)
param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(
        type='MultiStepLR',
        begin=0,
        end=24,
        by_epoch=True,
        milestones=[16, 22],
        gamma=0.1)
]
