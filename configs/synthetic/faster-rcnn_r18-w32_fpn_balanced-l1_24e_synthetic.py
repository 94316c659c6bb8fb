# The synthetic-data Faster R-CNN with the Balanced L1 Loss of Libra R-CNN
# as the bbox head's regression loss; everything else, the seed included,
# is the L1 baseline's.
_base_ = './faster-rcnn_r18-w32_fpn_24e_synthetic.py'

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
