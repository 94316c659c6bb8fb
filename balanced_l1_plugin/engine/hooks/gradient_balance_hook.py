# Copyright (c) balanced_l1_plugin authors. All rights reserved.
"""Measure how the regression gradient splits between inliers and outliers.

Libra R-CNN argues that under smooth L1 the inliers (``|x| < beta`` with
``x = pred - target``) receive only a small part of the regression gradient
and that Balanced L1 gives them more. :class:`RegressionGradientHook` reads
that split from the gradients autograd really computes in a run.
"""
import fnmatch
import inspect
import logging
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmdet.models.losses import BalancedL1Loss as MMDetBalancedL1Loss
from mmdet.models.losses import L1Loss, SmoothL1Loss
from mmengine import dist
from mmengine.hooks import Hook, LoggerHook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from torch import Tensor

from balanced_l1_plugin.models.losses import BalancedL1Loss
from balanced_l1_plugin.models.losses.balanced_l1_loss import \
    check_positive
from balanced_l1_plugin.registry import HOOKS

#: Loss classes whose element-wise gradient the hook can attribute to
#: inliers and outliers: they take ``(pred, target, weight, ...)`` of one
#: shape and define the threshold ``beta`` (L1Loss takes the hook's).
SUPPORTED_LOSSES = (BalancedL1Loss, MMDetBalancedL1Loss, SmoothL1Loss, L1Loss)

#: Keys written to the message hub, without the ``train/`` prefix that
#: MMEngine's log processor strips.
SCALAR_KEYS = ('reg_grad/inlier_ratio', 'reg_grad/inlier_grad_mean',
               'reg_grad/outlier_grad_mean', 'reg_grad/inlier_grad_share')

_MISSING = object()


class _LossTarget(NamedTuple):
    """A loss module the hook records, with what recording it needs."""
    name: str
    module: nn.Module
    beta: float
    signature: inspect.Signature


def _sample_mask(weight: Optional[Tensor], pred: Tensor) -> Optional[Tensor]:
    """Boolean mask of the elements of ``pred`` whose weight is non-zero.

    A per-box weight of shape ``pred.shape[:-1]`` covers all coordinates of
    its box, as in MMDetection's losses.
    """
    if not isinstance(weight, Tensor):
        return None
    valid = weight != 0
    if pred.dim() > 0 and valid.dim() == pred.dim() - 1 \
            and valid.shape == pred.shape[:-1]:
        valid = valid.unsqueeze(-1)
    return torch.broadcast_to(valid, pred.shape)


@HOOKS.register_module()
class RegressionGradientHook(Hook):
    r"""Log the inlier/outlier split of the regression-loss gradient.

    Every ``interval`` training iterations the hook wraps the ``forward`` of
    the selected regression losses for that one iteration, places a view of
    ``pred`` between the head and the loss, and reads the gradient autograd
    computes for that view during the ordinary backward pass. The gradient
    therefore includes the loss's weights, ``avg_factor`` and
    ``loss_weight``. Any factor applied to the loss after it leaves the loss
    module (AMP loss scaling, gradient accumulation) is divided out, so the
    numbers are derivatives of the loss module's own output. On all other
    iterations the losses are not touched.

    A *sample* is one element of the regression target of a loss call with
    a non-zero weight: one coordinate of one positive box (for anchor-based
    dense heads, the coordinates of negative anchors have weight 0 and are
    not samples). It is an *inlier* when ``|pred - target| < beta`` for the
    ``beta`` of its loss, and an *outlier* otherwise. All calls of the
    selected losses in the recorded iteration are pooled: several stages
    (Cascade R-CNN), several FPN levels, several losses, and in distributed
    training all processes.

    Written to the message hub (as ``train/<key>``, so they appear in the
    log, in ``vis_data/scalars.json`` and in every visualization backend):

    - ``reg_grad/inlier_ratio``: inliers / samples.
    - ``reg_grad/inlier_grad_mean``: mean ``|dL/dpred|`` over inliers.
    - ``reg_grad/outlier_grad_mean``: mean ``|dL/dpred|`` over outliers.
    - ``reg_grad/inlier_grad_share``: the inliers' part of the summed
      ``|dL/dpred|`` of all samples.

    A value that is undefined in a recorded iteration (a mean over no
    inliers, a share of a zero gradient) is not written for it.

    Note:
        ``L1Loss`` has no threshold; the hook's ``beta`` decides its
        inliers. For heads with ``reg_decoded_bbox=True`` the loss sees
        decoded boxes, so ``x`` is in pixels and ``beta`` is too.

    Note:
        The log processor shows the latest value of these keys at every
        logging step. Unless ``interval`` divides the ``LoggerHook``
        interval, some logging steps fall between recordings and repeat
        the last recorded values (the hook warns when the training starts);
        an equal interval (the default, 50, is MMDetection's) avoids that.

    Args:
        interval (int): Record every ``interval`` training iterations,
            counted like ``LoggerHook`` counts them (within the epoch for
            epoch-based loops). Defaults to 50.
        loss_paths (list[str] | tuple[str], optional): Names of the loss
            modules to record, as ``model.named_modules()`` gives them
            (without a model wrapper's ``module.``), with ``fnmatch``
            wildcards, e.g. ``['rpn_head.loss_bbox']`` or
            ``['*loss_bbox']``. Each pattern must match at least one
            module, and every module matched must be a supported loss
            (checked when the training starts). Defaults to None: every
            ``loss_bbox`` of the RoI head when the model has one (all stages
            of a cascade), else every ``loss_bbox`` in the model; losses of
            other types are then skipped with a warning.
        beta (float): Inlier threshold for ``L1Loss``, which has none.
            The other supported losses use their own ``beta``.
            Defaults to 1.0.

    Raises:
        TypeError: ``interval`` is not an int, ``loss_paths`` is not a
            list or tuple of strings, ``beta`` is not a real number, or
            (when the training starts) a ``loss_paths`` pattern matches a
            module that is not a supported loss.
        ValueError: ``interval < 1``, ``beta`` is not finite and ``> 0``,
            or (when the training starts) a ``loss_paths`` pattern matches
            no module.

    Example:
        >>> custom_hooks = [
        ...     dict(type='balanced_l1_plugin.RegressionGradientHook',
        ...          interval=50)]
    """

    priority = 'NORMAL'

    def __init__(self,
                 interval: int = 50,
                 loss_paths: Optional[Sequence[str]] = None,
                 beta: float = 1.0) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int):
            raise TypeError(
                f'interval must be an int, got {interval!r} of type '
                f'{type(interval).__name__}')
        if interval < 1:
            raise ValueError(f'interval must be >= 1, got {interval!r}')
        if loss_paths is not None:
            # A bare string would be taken as a sequence of one-letter
            # patterns.
            is_list = isinstance(loss_paths, (list, tuple))
            if not is_list or not all(isinstance(p, str) for p in loss_paths):
                raise TypeError(
                    f'loss_paths must be a sequence of str or None, got '
                    f'{loss_paths!r}')
            loss_paths = tuple(loss_paths)
        self.interval = interval
        self.loss_paths = loss_paths
        self.beta = check_positive('beta', beta)
        self._targets: Optional[List[_LossTarget]] = None
        self._wrapped: List[Tuple[nn.Module, object]] = []
        self._records: List[Tensor] = []
        self._device = torch.device('cpu')

    # ------------------------------------------------------------------
    # Selecting the losses

    def find_losses(self, model: nn.Module) -> List[Tuple[str, nn.Module]]:
        """Return ``(name, loss)`` for every loss module the hook records.

        Args:
            model (nn.Module): The model, possibly inside a model wrapper.

        Returns:
            list[tuple[str, nn.Module]]: Names as in ``named_modules()`` of
            the unwrapped model, in that order.
        """
        if is_model_wrapper(model):
            model = model.module
        modules = list(model.named_modules())

        if self.loss_paths is not None:
            return self._match_patterns(modules)

        if isinstance(getattr(model, 'roi_head', None), nn.Module):
            candidates = [(n, m) for n, m in modules
                          if n.startswith('roi_head.')
                          and n.rsplit('.', 1)[-1] == 'loss_bbox']
        else:
            candidates = [(n, m) for n, m in modules
                          if n.rsplit('.', 1)[-1] == 'loss_bbox']
        found = []
        for name, module in candidates:
            if isinstance(module, SUPPORTED_LOSSES):
                found.append((name, module))
            else:
                print_log(
                    f'RegressionGradientHook: skipping {name} '
                    f'({type(module).__name__}): only '
                    f'{_type_names(SUPPORTED_LOSSES)} are supported',
                    logger='current',
                    level=logging.WARNING)
        if not found:
            print_log(
                'RegressionGradientHook: the model has no supported '
                'regression loss; nothing will be recorded',
                logger='current',
                level=logging.WARNING)
        return found

    def _match_patterns(
            self,
            modules: List[Tuple[str,
                                nn.Module]]) -> List[Tuple[str, nn.Module]]:
        found = {}
        for pattern in self.loss_paths:
            matched = [(n, m) for n, m in modules
                       if n and fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                raise ValueError(
                    f'loss_paths: pattern {pattern!r} matches no module of '
                    f'the model')
            for name, module in matched:
                if not isinstance(module, SUPPORTED_LOSSES):
                    raise TypeError(
                        f'loss_paths: pattern {pattern!r} matches {name} of '
                        f'type {type(module).__name__}; supported losses '
                        f'are {_type_names(SUPPORTED_LOSSES)}')
                found[name] = module
        return sorted(found.items(), key=lambda item: item[0])

    def _resolve(self, runner) -> List[_LossTarget]:
        if self._targets is None:
            targets = []
            for name, module in self.find_losses(runner.model):
                beta = self.beta if isinstance(module, L1Loss) else float(
                    module.beta)
                targets.append(
                    _LossTarget(name, module, beta,
                                inspect.signature(module.forward)))
            self._targets = targets
            self._device = _model_device(runner.model)
        return self._targets

    # ------------------------------------------------------------------
    # Runner callbacks

    def before_train(self, runner) -> None:
        """Find the losses and check the logging interval."""
        targets = self._resolve(runner)
        if targets:
            print_log(
                f'RegressionGradientHook (interval={self.interval}) '
                'records ' + ', '.join(
                    f'{t.name} ({type(t.module).__name__}, beta={t.beta:g})'
                    for t in targets),
                logger='current')
        for hook in getattr(runner, 'hooks', ()):
            if isinstance(hook, LoggerHook) \
                    and hook.interval % self.interval != 0:
                print_log(
                    f'RegressionGradientHook: interval {self.interval} does '
                    f'not divide the LoggerHook interval {hook.interval}; '
                    'logging steps between recordings repeat the last '
                    'recorded values (plot_curves.py shares drops the '
                    'repeats)',
                    logger='current',
                    level=logging.WARNING)

    def before_train_iter(self,
                          runner,
                          batch_idx: int,
                          data_batch=None) -> None:
        """Wrap the losses' ``forward`` when this iteration is recorded."""
        if not self.every_n_inner_iters(batch_idx, self.interval):
            return
        self._restore()
        self._records = []
        for target in self._resolve(runner):
            self._wrap(target)

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch=None,
                         outputs=None) -> None:
        """Restore the losses and publish the recorded numbers."""
        if not self._wrapped:
            return
        self._restore()
        totals = self._gather()
        for key, value in self.compute_scalars(totals).items():
            runner.message_hub.update_scalar(f'train/{key}', value)

    def after_train(self, runner) -> None:
        """Leave no wrapper behind, even after an interrupted iteration."""
        self._restore()

    # ------------------------------------------------------------------
    # Recording

    def _wrap(self, target: _LossTarget) -> None:
        module = target.module
        own_forward = module.__dict__.get('forward', _MISSING)
        original = module.forward
        module.forward = self._recording_forward(original, target)
        self._wrapped.append((module, own_forward))

    def _restore(self) -> None:
        for module, own_forward in reversed(self._wrapped):
            if own_forward is _MISSING:
                module.__dict__.pop('forward', None)
            else:
                module.forward = own_forward
        self._wrapped = []

    def _recording_forward(self, original: Callable,
                           target: _LossTarget) -> Callable:

        def forward(*args, **kwargs):
            try:
                bound = target.signature.bind(*args, **kwargs)
            except TypeError:
                return original(*args, **kwargs)
            pred = bound.arguments.get('pred')
            label = bound.arguments.get('target')
            if not (isinstance(pred, Tensor) and isinstance(label, Tensor)
                    and pred.requires_grad and torch.is_grad_enabled()):
                return original(*args, **kwargs)

            # The view's gradient comes from this loss call alone, even if
            # the head uses ``pred`` elsewhere too.
            pred_view = pred.view_as(pred)
            bound.arguments['pred'] = pred_view
            loss = original(*bound.args, **bound.kwargs)

            out_grad = [None]
            if isinstance(loss, Tensor) and loss.requires_grad \
                    and loss.numel() == 1:
                loss.register_hook(lambda grad: out_grad.__setitem__(0, grad))
            weight = bound.arguments.get('weight')
            pred_view.register_hook(
                lambda grad: self._record(grad, out_grad[0], pred.detach(),
                                          label.detach(), weight, target.beta))
            return loss

        return forward

    def _record(self, grad: Tensor, out_grad: Optional[Tensor], pred: Tensor,
                target: Tensor, weight: Optional[Tensor], beta: float) -> None:
        """Add one loss call's counts and gradient sums to the records."""
        with torch.no_grad():
            inlier = (pred.float() - target.float()).abs() < beta
            masks = torch.stack([inlier, ~inlier]).reshape(2, -1)
            valid = _sample_mask(weight, pred)
            if valid is not None:
                masks &= valid.reshape(1, -1)
            masks = masks.float()
            counts = masks.sum(1, dtype=torch.float64)
            sums = (masks @ grad.abs().float().flatten()).double()
            if out_grad is not None:
                # The backward pass reaches the loss multiplied by whatever
                # the training step applied to it (AMP's loss scale, 1 /
                # accumulation steps); divide that out. A zero factor means
                # zero gradients, which the clamp keeps at zero.
                scale = out_grad.abs().double().reshape(())
                sums /= scale.clamp_min(torch.finfo(torch.float64).tiny)
            self._records.append(torch.cat([counts, sums]))

    def _gather(self) -> List[float]:
        """Sum the records of all calls and processes, in one sync."""
        if self._records:
            device = self._records[0].device
            totals = torch.stack([r.to(device) for r in self._records]).sum(0)
        else:
            totals = torch.zeros(4, dtype=torch.float64, device=self._device)
        self._records = []
        # Every process reaches this point on the same iterations, so the
        # collective is matched even where one process recorded nothing.
        dist.all_reduce(totals)
        return totals.tolist()

    @staticmethod
    def compute_scalars(totals: Sequence[float]) -> dict:
        """Turn summed counts and gradients into the logged numbers.

        Args:
            totals (Sequence[float]): Number of inliers, number of outliers,
                summed ``|grad|`` of inliers, summed ``|grad|`` of outliers.

        Returns:
            dict: The keys of :data:`SCALAR_KEYS` whose value is defined.
        """
        n_in, n_out, sum_in, sum_out = totals
        scalars = {}
        if n_in + n_out == 0:
            return scalars
        scalars['reg_grad/inlier_ratio'] = n_in / (n_in + n_out)
        if n_in > 0:
            scalars['reg_grad/inlier_grad_mean'] = sum_in / n_in
        if n_out > 0:
            scalars['reg_grad/outlier_grad_mean'] = sum_out / n_out
        if sum_in + sum_out > 0:
            scalars['reg_grad/inlier_grad_share'] = sum_in / (sum_in + sum_out)
        return scalars


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device('cpu')


def _type_names(types: tuple) -> str:
    return ', '.join(f'{t.__module__}.{t.__name__}' for t in types)
