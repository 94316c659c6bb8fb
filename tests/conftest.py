"""Fixtures shared by the tests that build and train detectors."""
import copy
from typing import Callable, Dict, List

import pytest
import torch

# Channels of a ResNet's four stages at base width 16: 16 * 2**i for the
# basic blocks of ResNet-18, four times that for bottlenecks.
_BASE_CHANNELS = 16
_WIDTH = 32
_FC_WIDTH = 64
_HEAD_CHANNEL_KEYS = ('in_channels', 'feat_channels', 'out_channels')
_REG_LAYERS = ('fc_reg', 'rpn_reg', 'retina_reg')


def _shrink_backbone(backbone: dict) -> List[int]:
    """Shrink a ResNet/ResNeXt in place; return its output channels."""
    backbone['init_cfg'] = None
    backbone.pop('pretrained', None)
    backbone['base_channels'] = _BASE_CHANNELS
    if backbone['type'] == 'ResNet':
        backbone['depth'] = 18
        expansion = 1
    elif backbone['type'] == 'ResNeXt':
        # ResNeXt has no basic-block variant; 50 is its smallest depth.
        backbone['depth'] = 50
        expansion = 4
    else:
        raise ValueError(
            f'backbone type {backbone["type"]!r} has no shrinking rule')
    out_indices = backbone.get('out_indices', (0, 1, 2, 3))
    return [_BASE_CHANNELS * expansion * 2**i for i in out_indices]


def _shrink_heads(cfg, stage_channels: List[int]) -> None:
    """Narrow every 256-channel neck/head layer and 1024-wide FC in place."""
    if isinstance(cfg, list):
        for item in cfg:
            _shrink_heads(item, stage_channels)
        return
    if not isinstance(cfg, dict):
        return
    if cfg.get('type') == 'FPN':
        cfg['in_channels'] = list(stage_channels)
    for key, value in cfg.items():
        if key in _HEAD_CHANNEL_KEYS and value == 256:
            cfg[key] = _WIDTH
        elif key == 'fc_out_channels' and value == 1024:
            cfg[key] = _FC_WIDTH
        elif key == 'stacked_convs' and isinstance(value, int) and value > 1:
            cfg[key] = 1
        else:
            _shrink_heads(value, stage_channels)


def shrink_detector(model_cfg: dict) -> dict:
    """A copy of a detector config small enough for one CPU step.

    The structure (detector, neck, heads, samplers, losses) stays; the
    backbone becomes a quarter-width ResNet-18 (ResNeXt-50 for ResNeXt)
    without pretrained weights and the neck and heads 32 channels wide.
    """
    cfg = copy.deepcopy(model_cfg)
    stage_channels = _shrink_backbone(cfg['backbone'])
    for key, value in cfg.items():
        if key != 'backbone':
            _shrink_heads(value, stage_channels)
    return cfg


def detector_train_step(model: torch.nn.Module,
                        num_classes: int,
                        image_size: int = 64) -> Dict[str, torch.Tensor]:
    """Run forward and backward of one batch of two random images.

    Returns:
        dict: The losses the model returned.
    """
    from mmdet.testing import demo_mm_inputs

    model.train()
    batch = demo_mm_inputs(
        batch_size=2,
        image_shapes=(3, image_size, image_size),
        num_items=[3, 2],
        num_classes=num_classes)
    data = model.data_preprocessor(batch, True)
    losses = model.loss(data['inputs'], data['data_samples'])
    loss, _ = model.parse_losses(losses)
    model.zero_grad()
    loss.backward()
    return losses


def regression_layers(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """The box regression layers of a detector, by module name."""
    return {
        name: module
        for name, module in model.named_modules()
        if name.split('.')[-1] in _REG_LAYERS
    }


@pytest.fixture
def shrink() -> Callable[[dict], dict]:
    return shrink_detector


@pytest.fixture
def train_step() -> Callable[..., Dict[str, torch.Tensor]]:
    return detector_train_step


@pytest.fixture
def reg_layers() -> Callable[[torch.nn.Module], Dict[str, torch.nn.Module]]:
    return regression_layers
