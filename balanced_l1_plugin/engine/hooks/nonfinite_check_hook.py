"""Stop training at the first NaN or Inf, before it reaches the weights."""
import logging
from functools import partial
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from torch import Tensor

from balanced_l1_plugin.registry import HOOKS

# Class names of the box regression losses of MMDetection and of this
# plugin (which shares the name ``BalancedL1Loss``).
REGRESSION_LOSSES = ('BalancedL1Loss', 'SmoothL1Loss', 'L1Loss', 'MSELoss',
                     'IoULoss', 'BoundedIoULoss', 'GIoULoss', 'DIoULoss',
                     'CIoULoss', 'EIoULoss', 'SIoULoss')

# Positional order of the inputs of every loss above.
_INPUT_NAMES = ('pred', 'target', 'weight')


@HOOKS.register_module()
class NonFiniteCheckHook(Hook):
    """Raise at the first non-finite loss input or loss of a training run.

    A NaN or Inf in a box regression input spreads through the loss and the
    gradient into every weight in one optimizer step, and the log shows it
    only as ``loss: nan`` from then on. This hook checks, at every training
    iteration, the ``pred``, ``target`` and ``weight`` inputs of each
    regression loss module of the model (see ``loss_types``) and each
    ``loss*`` entry the model returns (the terms of the total loss), and
    raises ``FloatingPointError`` naming the iteration, the loss module and
    the input as soon as one is not finite. That is before the backward
    pass, so the weights stay those of the previous iteration.

    Enable it from a config with::

        custom_hooks = [dict(type='balanced_l1_plugin.NonFiniteCheckHook')]

    Note:
        Each loss call's inputs, and the returned losses, are checked with
        one ``torch.isfinite(...).all()`` reduction each whose result is read
        once; on a GPU that read waits for the kernels queued before it, a
        few synchronisations per iteration. Validation and testing are not
        checked.

    Args:
        loss_types (Sequence[str], optional): Class names of the loss
            modules whose inputs are checked. Defaults to None, which means
            :data:`REGRESSION_LOSSES`.
        check_losses (bool): Whether to check the ``loss*`` entries the
            model returns as well. Defaults to True.

    Raises:
        TypeError: ``loss_types`` is not a sequence of class names.
    """

    def __init__(self,
                 loss_types: Optional[Sequence[str]] = None,
                 check_losses: bool = True) -> None:
        if loss_types is None:
            loss_types = REGRESSION_LOSSES
        if (isinstance(loss_types, str)
                or not isinstance(loss_types, (list, tuple))
                or not all(isinstance(t, str) for t in loss_types)):
            raise TypeError(
                f'loss_types must be a list or tuple of class names, got '
                f'{loss_types!r}')
        if not isinstance(check_losses, bool):
            raise TypeError(
                f'check_losses must be a bool, got {check_losses!r}')
        self.loss_types = tuple(loss_types)
        self.check_losses = check_losses
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._where: Optional[str] = None

    def before_train(self, runner) -> None:
        """Attach the checks to the loss modules and the model."""
        self._remove_handles()
        model = runner.model
        if is_model_wrapper(model):
            model = model.module

        watched = []
        for name, module in model.named_modules():
            if type(module).__name__ in self.loss_types:
                self._handles.append(
                    module.register_forward_pre_hook(
                        partial(self._check_inputs, name), with_kwargs=True))
                watched.append(f'{name} ({type(module).__name__})')
        if self.check_losses:
            self._handles.append(
                model.register_forward_hook(self._check_outputs))

        if watched:
            print_log(
                f'NonFiniteCheckHook checks the inputs of {watched}',
                logger='current')
        else:
            print_log(
                f'NonFiniteCheckHook found no loss module of the types '
                f'{self.loss_types} in the model; it checks only the losses '
                'the model returns',
                logger='current',
                level=logging.WARNING)

    def before_train_iter(self,
                          runner,
                          batch_idx: int,
                          data_batch: Any = None) -> None:
        """Start checking, and remember where training is."""
        self._where = (f'iteration {runner.iter + 1} (epoch '
                       f'{runner.epoch + 1}, batch {batch_idx + 1})')

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: Any = None,
                         outputs: Optional[dict] = None) -> None:
        """Stop checking until the next training iteration."""
        self._where = None

    def after_train(self, runner) -> None:
        """Detach the checks."""
        self._remove_handles()
        self._where = None

    def _remove_handles(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _check_inputs(self, name: str, module: nn.Module, args: tuple,
                      kwargs: Dict[str, Any]) -> None:
        if self._where is None:
            return
        inputs = [(input_name, args[i] if i < len(args) else
                   kwargs.get(input_name))
                  for i, input_name in enumerate(_INPUT_NAMES)]
        if _all_finite(*(value for _, value in inputs)):
            return
        for input_name, value in inputs:
            if not _all_finite(value):
                raise FloatingPointError(
                    f'Non-finite value at {self._where}: input '
                    f'"{input_name}" of the loss module "{name}" '
                    f'({type(module).__name__}) has {_count(value)}. '
                    'Training stopped before the optimizer step, so the '
                    'weights are those of the previous iteration.')

    def _check_outputs(self, model: nn.Module, args: tuple,
                       outputs: Any) -> None:
        if self._where is None or not isinstance(outputs, dict):
            return
        losses = {
            key: value if isinstance(value, (list, tuple)) else [value]
            for key, value in outputs.items() if 'loss' in key
        }
        if _all_finite(*(item for values in losses.values()
                         for item in values)):
            return
        for key, values in losses.items():
            for i, item in enumerate(values):
                if not _all_finite(item):
                    part = f'[{i}]' if len(values) > 1 else ''
                    state = (f'is {item.item()}'
                             if item.numel() == 1 else f'has {_count(item)}')
                    raise FloatingPointError(
                        f'Non-finite value at {self._where}: loss '
                        f'"{key}{part}" {state}. Training stopped before the '
                        'optimizer step, so the weights are those of the '
                        'previous iteration.')


def _all_finite(*values: Any) -> bool:
    """Whether every floating-point tensor among ``values`` is finite.

    One reduction and one read of its result for all of them: on a GPU each
    read waits for the queued kernels, so the values are checked together
    and looked at one by one only to report a failure.
    """
    flags = [
        torch.isfinite(value).all() for value in values
        if isinstance(value, Tensor) and value.numel() > 0 and (
            value.is_floating_point() or value.is_complex())
    ]
    if not flags:
        return True
    if len(flags) > 1 and len({flag.device for flag in flags}) > 1:
        return all(bool(flag) for flag in flags)
    return bool(torch.stack(flags).all())


def _count(tensor: Tensor) -> str:
    """Count the non-finite values of ``tensor`` (slow, for errors)."""
    tensor = tensor.detach()
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    return (f'{nan} NaN and {inf} Inf of {tensor.numel()} values '
            f'(shape {tuple(tensor.shape)})')
