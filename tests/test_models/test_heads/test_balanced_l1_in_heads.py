"""The plugin's loss trains every kind of head that takes ``loss_bbox``."""
import os.path as osp

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.utils import get_installed_path

from balanced_l1_plugin import BalancedL1Loss

MMDET_CONFIG_DIR = osp.join(get_installed_path('mmdet'), '.mim', 'configs')
PLUGIN_LOSS = dict(
    type='balanced_l1_plugin.BalancedL1Loss',
    alpha=0.5,
    gamma=1.5,
    beta=1.0,
    loss_weight=1.0)


def _with_loss(loss_bbox: dict, **extra) -> dict:
    # ``update`` replaces the whole loss dict: nothing of the old loss stays.
    return dict(loss_bbox=dict(loss_bbox), **extra)


def _roi_head(model):
    model.roi_head.bbox_head.update(_with_loss(PLUGIN_LOSS))


def _rpn_head(model):
    model.rpn_head.update(_with_loss(PLUGIN_LOSS))


def _retina_head(model):
    model.bbox_head.update(_with_loss(dict(PLUGIN_LOSS, beta=0.11)))


def _cascade_heads(model):
    for head in model.roi_head.bbox_head:
        head.update(_with_loss(PLUGIN_LOSS))


def _decoded_roi_head(model):
    # On decoded boxes the regression error is in pixels, so the threshold
    # is in pixels too.
    model.roi_head.bbox_head.update(
        _with_loss(dict(PLUGIN_LOSS, beta=4.0), reg_decoded_bbox=True))


# (case, mmdet config, how the loss is set, heads whose loss is the plugin's,
#  their regression layers, the keys of their box losses)
CASES = [
    ('roi', 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', _roi_head,
     ['roi_head.bbox_head'], ['roi_head.bbox_head.fc_reg'], ['loss_bbox']),
    ('rpn', 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', _rpn_head,
     ['rpn_head'], ['rpn_head.rpn_reg'], ['loss_rpn_bbox']),
    ('retinanet', 'retinanet/retinanet_r50_fpn_1x_coco.py', _retina_head,
     ['bbox_head'], ['bbox_head.retina_reg'], ['loss_bbox']),
    ('cascade', 'cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py', _cascade_heads,
     [f'roi_head.bbox_head.{i}'
      for i in range(3)], [f'roi_head.bbox_head.{i}.fc_reg' for i in range(3)
                           ], [f's{i}.loss_bbox' for i in range(3)]),
    ('decoded', 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
     _decoded_roi_head, ['roi_head.bbox_head'], ['roi_head.bbox_head.fc_reg'
                                                 ], ['loss_bbox']),
]


@pytest.fixture(scope='module', autouse=True)
def mmdet_scope():
    register_all_modules(init_default_scope=True)


def _total(loss) -> torch.Tensor:
    """A loss, or the sum of a per-level list of losses."""
    return sum(loss) if isinstance(loss, list) else loss


@pytest.mark.parametrize(
    'case, config, set_loss, heads, reg_names, loss_keys',
    CASES,
    ids=[case[0] for case in CASES])
def test_one_training_step(case, config, set_loss, heads, reg_names, loss_keys,
                           shrink, train_step):
    cfg = Config.fromfile(osp.join(MMDET_CONFIG_DIR, config))
    set_loss(cfg.model)
    model_cfg = shrink(cfg.model)
    torch.manual_seed(0)
    model = MODELS.build(model_cfg)
    modules = dict(model.named_modules())
    for name in heads:
        assert isinstance(modules[name].loss_bbox, BalancedL1Loss), name
    if case == 'decoded':
        assert modules['roi_head.bbox_head'].reg_decoded_bbox
        assert modules['roi_head.bbox_head'].loss_bbox.beta == 4.0

    losses = train_step(model, num_classes=80)

    for key, value in losses.items():
        for item in value if isinstance(value, list) else [value]:
            assert torch.isfinite(item).all(), key
    for key in loss_keys:
        # Some FPN levels may hold no positive anchor; the sum may not be 0.
        assert _total(losses[key]).item() > 0, (key, losses[key])
    for name in reg_names:
        grad = modules[name].weight.grad
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum().item() > 0, name
