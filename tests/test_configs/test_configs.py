"""Every config of configs/ loads, builds and trains one step on CPU; the
Libra R-CNN configs are MMDetection's except for the loss."""
import argparse
import copy
import glob
import math
import os.path as osp

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config, DictAction
from mmengine.utils import get_installed_path

from balanced_l1_plugin import BalancedL1Loss

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG_DIR = osp.join(REPO, 'configs')
CONFIGS = sorted(
    osp.relpath(path, CONFIG_DIR)
    for path in glob.glob(osp.join(CONFIG_DIR, '**', '*.py'), recursive=True))

MMDET_CONFIG_DIR = osp.join(get_installed_path('mmdet'), '.mim', 'configs')
PLUGIN_LOSS = 'balanced_l1_plugin.BalancedL1Loss'
BALANCED_L1_TYPES = ('BalancedL1Loss', PLUGIN_LOSS)

# Each Libra config of this repository and MMDetection's config it must
# equal in everything but the loss implementation.
LIBRA_PAIRS = [
    ('libra_rcnn/libra-faster-rcnn_r50_fpn_1x_coco.py',
     'mmdet::libra_rcnn/libra-faster-rcnn_r50_fpn_1x_coco.py'),
    ('libra_rcnn/libra-faster-rcnn_r101_fpn_1x_coco.py',
     'mmdet::libra_rcnn/libra-faster-rcnn_r101_fpn_1x_coco.py'),
    ('libra_rcnn/libra-faster-rcnn_x101-64x4d_fpn_1x_coco.py',
     'mmdet::libra_rcnn/libra-faster-rcnn_x101-64x4d_fpn_1x_coco.py'),
    ('libra_rcnn/libra-faster-rcnn_r50_fpn_2x_coco.py',
     'mmdet::libra_rcnn/libra-faster-rcnn_r50_fpn_1x_coco.py'),
    ('libra_rcnn/libra-retinanet_r50_fpn_1x_coco.py',
     'mmdet::libra_rcnn/libra-retinanet_r50_fpn_1x_coco.py'),
]

ABLATION = [(0.2, 1.0), (0.3, 1.0), (0.5, 1.0), (0.5, 1.5), (0.5, 2.0)]


def load(name: str) -> Config:
    """A config of this repository, or MMDetection's as 'mmdet::path'."""
    if name.startswith('mmdet::'):
        return Config.fromfile(
            osp.join(MMDET_CONFIG_DIR, name[len('mmdet::'):]))
    return Config.fromfile(osp.join(CONFIG_DIR, name))


def strip_scope(cfg):
    """Drop the ``_scope_='mmdet'`` that inheriting through 'mmdet::' adds
    to every dict (MMDetection's own configs get the scope from
    ``default_scope``)."""
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(strip_scope(item) for item in cfg)
    if isinstance(cfg, dict):
        return {
            key: strip_scope(value)
            for key, value in cfg.items() if key != '_scope_'
        }
    return cfg


def normalise_losses(cfg):
    """Map both Balanced L1 implementations to one type name."""
    if isinstance(cfg, list):
        return [normalise_losses(item) for item in cfg]
    if isinstance(cfg, dict):
        out = {key: normalise_losses(value) for key, value in cfg.items()}
        if out.get('type') in BALANCED_L1_TYPES:
            out['type'] = 'BalancedL1Loss'
        return out
    return cfg


def roi_loss(cfg: Config) -> dict:
    return cfg.model.roi_head.bbox_head.loss_bbox.to_dict()


def without(cfg: Config, *keys: str) -> dict:
    out = strip_scope(cfg.to_dict())
    for key in keys:
        out.pop(key, None)
    return out


@pytest.fixture(scope='module', autouse=True)
def mmdet_scope():
    register_all_modules(init_default_scope=True)


def test_configs_found():
    assert len(CONFIGS) >= 13, CONFIGS


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_with_custom_imports(name):
    cfg = load(name)
    assert cfg.custom_imports == dict(
        imports=['balanced_l1_plugin'], allow_failed_imports=False)
    assert cfg.model.type in ('FasterRCNN', 'RetinaNet')


@pytest.mark.parametrize('name', CONFIGS)
def test_config_trains_one_step(name, shrink, train_step, reg_layers):
    cfg = load(name)
    model_cfg = shrink(cfg.model)
    torch.manual_seed(0)
    model = MODELS.build(model_cfg)
    heads = [model.roi_head.bbox_head] if hasattr(
        model, 'roi_head') else [model.bbox_head]
    num_classes = heads[0].num_classes

    losses = train_step(model, num_classes=num_classes)

    for key, value in losses.items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            assert torch.isfinite(item).all(), (key, item)
    bbox_losses = [
        value for key, value in losses.items() if 'loss_bbox' in key
    ]
    assert bbox_losses and all(
        sum(v if isinstance(v, list) else [v]).item() > 0 for v in bbox_losses)
    head = heads[0]
    reg = [
        module for name, module in reg_layers(model).items()
        if name.startswith('roi_head') or name.startswith('bbox_head')
    ]
    assert len(reg) == 1
    grad = reg[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert grad.abs().sum().item() > 0
    expected = (
        cfg.model.roi_head.bbox_head.loss_bbox.type if hasattr(
            model, 'roi_head') else cfg.model.bbox_head.loss_bbox.type)
    if expected == PLUGIN_LOSS:
        assert isinstance(head.loss_bbox, BalancedL1Loss)


@pytest.mark.parametrize('ours, theirs', LIBRA_PAIRS)
def test_libra_model_is_mmdet_model_but_for_loss(ours, theirs):
    cfg, ref = load(ours), load(theirs)

    assert cfg.model._scope_ == 'mmdet'
    assert normalise_losses(without(cfg, 'custom_imports')['model']) == (
        normalise_losses(ref.model.to_dict()))
    assert cfg.model.to_dict() != ref.model.to_dict()

    head = (
        cfg.model.bbox_head
        if cfg.model.type == 'RetinaNet' else cfg.model.roi_head.bbox_head)
    ref_head = (
        ref.model.bbox_head
        if ref.model.type == 'RetinaNet' else ref.model.roi_head.bbox_head)
    assert head.loss_bbox.type == PLUGIN_LOSS
    assert ref_head.loss_bbox.type == 'BalancedL1Loss'
    assert {
        k: v
        for k, v in head.loss_bbox.items() if k != 'type'
    } == {
        k: v
        for k, v in ref_head.loss_bbox.items() if k != 'type'
    }


@pytest.mark.parametrize('ours, theirs', LIBRA_PAIRS)
def test_libra_data_and_schedule_are_mmdet(ours, theirs):
    """Data, runtime and (but for 2x) schedule are MMDetection's own."""
    cfg, ref = load(ours), load(theirs)
    schedule = ('train_cfg', 'param_scheduler')
    skip = ('model', 'custom_imports') + (schedule if '2x' in ours else ())
    assert without(cfg, *skip) == without(ref, *skip)


def test_libra_2x_schedule_is_mmdet_2x():
    cfg = load('libra_rcnn/libra-faster-rcnn_r50_fpn_2x_coco.py')
    ref = load('mmdet::_base_/schedules/schedule_2x.py')
    assert strip_scope(cfg.train_cfg.to_dict()) == ref.train_cfg.to_dict()
    assert strip_scope(cfg.param_scheduler) == ref.param_scheduler
    assert cfg.train_cfg.max_epochs == 24
    assert cfg.param_scheduler[1].milestones == [16, 22]


def test_retinanet_beta():
    cfg = load('libra_rcnn/libra-retinanet_r50_fpn_1x_coco.py')
    assert cfg.model.bbox_head.loss_bbox.to_dict() == dict(
        type=PLUGIN_LOSS, alpha=0.5, gamma=1.5, beta=0.11, loss_weight=1.0)


@pytest.mark.parametrize('name, loss', [
    ('faster_rcnn/faster-rcnn_r50_fpn_l1_1x_coco.py',
     dict(type='L1Loss', loss_weight=1.0)),
    ('faster_rcnn/faster-rcnn_r50_fpn_smooth-l1_1x_coco.py',
     dict(type='SmoothL1Loss', beta=1.0, loss_weight=1.0)),
    ('faster_rcnn/faster-rcnn_r50_fpn_balanced-l1_1x_coco.py',
     dict(type=PLUGIN_LOSS, alpha=0.5, gamma=1.5, beta=1.0, loss_weight=1.0)),
])
def test_faster_rcnn_differs_from_mmdet_by_roi_loss_only(name, loss):
    cfg = load(name)
    ref = load('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py')
    assert roi_loss(cfg) == loss

    ours = without(cfg, 'custom_imports')
    theirs = ref.to_dict()
    ours['model']['roi_head']['bbox_head'].pop('loss_bbox')
    theirs['model']['roi_head']['bbox_head'].pop('loss_bbox')
    assert ours == theirs


@pytest.mark.parametrize('alpha, gamma', ABLATION)
def test_ablation_file(alpha, gamma):
    name = (f'ablation/faster-rcnn_r50_fpn_balanced-l1-a{alpha}-g{gamma}'
            '_1x_coco.py')
    cfg = load(name)
    assert roi_loss(cfg) == dict(
        type=PLUGIN_LOSS, alpha=alpha, gamma=gamma, beta=1.0, loss_weight=1.0)

    base = load('faster_rcnn/faster-rcnn_r50_fpn_balanced-l1_1x_coco.py')
    ours, theirs = cfg.to_dict(), base.to_dict()
    for c in (ours, theirs):
        c['model']['roi_head']['bbox_head'].pop('loss_bbox')
    assert ours == theirs


@pytest.mark.parametrize('alpha, gamma', ABLATION)
def test_cfg_options_reach_the_roi_loss(alpha, gamma):
    """The documented --cfg-options command gives the ablation file's cfg
    and a loss module with that alpha, gamma and b."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args([
        '--cfg-options',
        f'model.roi_head.bbox_head.loss_bbox.alpha={alpha}',
        f'model.roi_head.bbox_head.loss_bbox.gamma={gamma}',
    ])
    cfg = load('faster_rcnn/faster-rcnn_r50_fpn_balanced-l1_1x_coco.py')
    cfg.merge_from_dict(args.cfg_options)

    name = (f'ablation/faster-rcnn_r50_fpn_balanced-l1-a{alpha}-g{gamma}'
            '_1x_coco.py')
    assert roi_loss(cfg) == roi_loss(load(name))
    loss = MODELS.build(copy.deepcopy(roi_loss(cfg)))
    assert isinstance(loss, BalancedL1Loss)
    assert (loss.alpha, loss.gamma, loss.beta) == (alpha, gamma, 1.0)
    assert loss.b == pytest.approx(math.exp(gamma / alpha) - 1)
