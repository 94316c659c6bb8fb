"""NonFiniteCheckHook stops at the first NaN/Inf, before the weights move."""
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from mmdet.models.losses import CrossEntropyLoss, GIoULoss, SmoothL1Loss
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS as MMENGINE_HOOKS

from balanced_l1_plugin import BalancedL1Loss
from balanced_l1_plugin.engine.hooks import NonFiniteCheckHook
from balanced_l1_plugin.registry import HOOKS


class TinyDetector(nn.Module):
    """A learnt offset, a regression loss and a classification loss."""

    def __init__(self, loss_bbox: nn.Module) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(4))
        self.head = nn.Module()
        self.head.loss_bbox = loss_bbox
        self.loss_cls = CrossEntropyLoss(use_sigmoid=True)

    def forward(self, x, target, weight=None, as_kwargs=False, logit=0.0):
        pred = x + self.offset
        if as_kwargs:
            loss_bbox = self.head.loss_bbox(
                pred=pred, target=target, weight=weight)
        else:
            loss_bbox = self.head.loss_bbox(pred, target, weight)
        logits = torch.full((2, 1), logit)
        loss_cls = self.loss_cls(logits, torch.ones(2, 1))
        return dict(loss_bbox=loss_bbox, loss_cls=[loss_cls, loss_cls * 2])


def boxes(n: int = 3) -> torch.Tensor:
    xy = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2)
    return torch.cat([xy, xy + 2], dim=1)


def start(hook: NonFiniteCheckHook, model: nn.Module, it: int = 2):
    runner = SimpleNamespace(model=model, iter=it, epoch=0)
    hook.before_train(runner)
    hook.before_train_iter(runner, batch_idx=it)
    return runner


LOSSES = [BalancedL1Loss, SmoothL1Loss, GIoULoss]


@pytest.mark.parametrize('loss_type', LOSSES)
@pytest.mark.parametrize('input_name', ['pred', 'target', 'weight'])
@pytest.mark.parametrize('bad', [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize('as_kwargs', [False, True])
def test_bad_regression_input_names_iteration_module_and_input(
        loss_type, input_name, bad, as_kwargs):
    model = TinyDetector(loss_type())
    x, target, weight = boxes(), boxes() + 0.5, torch.ones(3)
    values = dict(pred=x, target=target, weight=weight)
    values[input_name] = values[input_name].clone()
    values[input_name][1, ...] = bad
    hook = NonFiniteCheckHook()
    start(hook, model, it=6)
    pattern = (f'Non-finite value at iteration 7 (epoch 1, batch 7): input '
               f'"{input_name}" of the loss module "head.loss_bbox" '
               f'({loss_type.__name__}) has ')
    with pytest.raises(FloatingPointError, match=re.escape(pattern)) as info:
        model(
            values['pred'],
            values['target'],
            values['weight'],
            as_kwargs=as_kwargs)
    count = 4 if input_name != 'weight' else 1
    nan, inf = (count, 0) if math.isnan(bad) else (0, count)
    assert f'{nan} NaN and {inf} Inf of {values[input_name].numel()}' \
        in str(info.value)


def test_finite_inputs_pass_and_nothing_is_checked_between_iterations():
    model = TinyDetector(BalancedL1Loss())
    hook = NonFiniteCheckHook()
    runner = start(hook, model)
    losses = model(boxes(), boxes() + 0.5)
    assert torch.isfinite(losses['loss_bbox'])

    # Validation and code outside the training step are not checked.
    hook.after_train_iter(runner, batch_idx=2)
    nan_target = torch.full((3, 4), math.nan)
    assert torch.isnan(model(boxes(), nan_target)['loss_bbox'])

    # after_train detaches the checks.
    hook.before_train_iter(runner, batch_idx=3)
    hook.after_train(runner)
    assert not model.head.loss_bbox._forward_pre_hooks
    assert not model._forward_hooks
    assert torch.isnan(model(boxes(), nan_target)['loss_bbox'])


def test_nonfinite_loss_names_its_key():
    model = TinyDetector(BalancedL1Loss())
    hook = NonFiniteCheckHook()
    start(hook, model, it=0)
    # The cross-entropy of a logit of -inf is NaN (inf - inf inside).
    with pytest.raises(
            FloatingPointError,
            match=re.escape('Non-finite value at iteration 1 (epoch 1, '
                            'batch 1): loss "loss_cls[0]" is nan')):
        model(boxes(), boxes(), logit=-math.inf)


def test_losses_unchecked_when_disabled():
    model = TinyDetector(BalancedL1Loss())
    start(NonFiniteCheckHook(check_losses=False), model)
    losses = model(boxes(), boxes(), logit=-math.inf)
    assert not math.isfinite(losses['loss_cls'][0].item())


def test_loss_types_choose_the_watched_modules():
    model = TinyDetector(SmoothL1Loss())
    start(NonFiniteCheckHook(loss_types=['BalancedL1Loss']), model)
    # Not watched: the bad target only shows in the returned loss.
    with pytest.raises(FloatingPointError, match='loss "loss_bbox" is nan'):
        model(boxes(), torch.full((3, 4), math.nan))


@pytest.mark.parametrize('kwargs, pattern', [
    (dict(loss_types='BalancedL1Loss'), 'loss_types must be a list or tuple'),
    (dict(loss_types=[BalancedL1Loss]), 'loss_types must be a list or tuple'),
    (dict(check_losses=1), 'check_losses must be a bool, got 1'),
])
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(TypeError, match=pattern):
        NonFiniteCheckHook(**kwargs)


def test_registered_under_the_plugin_scope():
    hook = HOOKS.build(dict(type='balanced_l1_plugin.NonFiniteCheckHook'))
    assert isinstance(hook, NonFiniteCheckHook)
    assert hook.loss_types[0] == 'BalancedL1Loss'


@MMENGINE_HOOKS.register_module(force=True)
class InjectNaNHook(Hook):
    """Turn the box regression output into NaN from iteration ``at_iter``."""

    def __init__(self, at_iter: int) -> None:
        self.at_iter = at_iter

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.iter + 1 == self.at_iter:
            model = runner.model
            model.bbox_head.atss_reg.register_forward_hook(
                lambda module, args, output: output * math.nan)


def run_with_nan(tiny_config, tmp_path, check: bool):
    from balanced_l1_plugin.engine.runner import build_runner
    hooks = [dict(type='InjectNaNHook', at_iter=3)]
    if check:
        hooks.append(dict(type='balanced_l1_plugin.NonFiniteCheckHook'))
    cfg = Config.fromfile(
        tiny_config(max_iters=4, checkpoint_interval=2, custom_hooks=hooks))
    cfg.work_dir = str(tmp_path / 'work')
    cfg.experiment_name = cfg.visualizer.name = f'{tmp_path.name}_{check}'
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    return build_runner(cfg)


@pytest.mark.slow
def test_nan_in_training_stops_before_the_optimizer_step(
        tiny_config, tmp_path):
    runner = run_with_nan(tiny_config, tmp_path, check=True)
    pattern = ('Non-finite value at iteration 3 (epoch 1, batch 3): input '
               '"pred" of the loss module "bbox_head.loss_bbox" '
               '(BalancedL1Loss) has ')
    with pytest.raises(FloatingPointError, match=re.escape(pattern)):
        runner.train()

    # The weights are still those saved after iteration 2.
    saved = torch.load(
        f'{runner.work_dir}/iter_2.pth',
        map_location='cpu',
        weights_only=False)['state_dict']
    state = runner.model.state_dict()
    assert saved.keys() == state.keys()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key


@pytest.mark.slow
def test_without_the_hook_nan_reaches_the_weights(tiny_config, tmp_path):
    runner = run_with_nan(tiny_config, tmp_path, check=False)
    runner.train()
    weights = runner.model.state_dict()
    assert not all(torch.isfinite(w).all() for w in weights.values())
