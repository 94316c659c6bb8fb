# Copyright (c) balanced_l1_plugin authors. All rights reserved.
"""Loss and gradient against regression error, as in Fig. 5 of Libra R-CNN.

Every curve is computed by the loss module a config would build (the
plugin's ``BalancedL1Loss``, MMDetection's ``SmoothL1Loss`` and ``L1Loss``)
in float64, and every gradient by autograd through that module, so a plot
shows what training computes, not a re-derivation of it.
"""
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from mmdet.models.losses import L1Loss, SmoothL1Loss

from balanced_l1_plugin.models.losses import BalancedL1Loss
from balanced_l1_plugin.models.losses.balanced_l1_loss import check_positive


class Curve(NamedTuple):
    """One loss sampled on a grid of regression errors.

    Attributes:
        label (str): Legend text, with the loss's parameters.
        x (np.ndarray): Regression errors ``x = pred - target``, float64.
        loss (np.ndarray): Element-wise loss at ``x``.
        grad (np.ndarray): ``d loss / d pred`` at ``x``, from autograd.
    """
    label: str
    x: np.ndarray
    loss: np.ndarray
    grad: np.ndarray


def regression_errors(x_max: float = 3.0,
                      num: int = 1201,
                      extra: Iterable[float] = ()) -> np.ndarray:
    """Sorted grid ``[0, x_max]`` with ``num`` points plus ``extra`` ones.

    Adding each loss's ``beta`` to the grid puts a point exactly on the
    switch between the inlier and the outlier branch.

    Args:
        x_max (float): Largest error. Defaults to 3.0.
        num (int): Number of evenly spaced points. Defaults to 1201.
        extra (Iterable[float]): Further points in ``[0, x_max]``.
            Defaults to ().

    Returns:
        np.ndarray: 1-D float64 array without duplicates.

    Raises:
        ValueError: ``x_max <= 0``, ``num < 2`` or an extra point outside
            ``[0, x_max]``.
    """
    check_positive('x_max', x_max)
    if num < 2:
        raise ValueError(f'num must be >= 2, got {num!r}')
    extra = np.asarray(list(extra), dtype=np.float64)
    if ((extra < 0) | (extra > x_max)).any():
        raise ValueError(f'extra points must lie in [0, x_max={x_max}], got '
                         f'{extra.tolist()}')
    return np.union1d(np.linspace(0.0, x_max, num), extra)


def loss_curve(loss: nn.Module, x: np.ndarray, label: str) -> Curve:
    """Evaluate an element-wise regression loss and its gradient at ``x``.

    Args:
        loss (nn.Module): An MMDetection-style loss taking ``pred``,
            ``target`` and ``reduction_override``.
        x (np.ndarray): Regression errors; ``pred = x`` and ``target = 0``.
        label (str): Legend text.

    Returns:
        Curve: Loss and gradient, both divided by nothing but the loss's own
        ``loss_weight``.
    """
    pred = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    values = loss(pred, torch.zeros_like(pred), reduction_override='none')
    grad, = torch.autograd.grad(values.sum(), pred)
    return Curve(label, np.asarray(x, dtype=np.float64),
                 values.detach().numpy(), grad.numpy())


def balanced_l1_curve(x: np.ndarray,
                      alpha: float = 0.5,
                      gamma: float = 1.5,
                      beta: float = 1.0) -> Curve:
    """The plugin's Balanced L1 Loss at ``x``; arguments as in the loss."""
    loss = BalancedL1Loss(alpha=alpha, gamma=gamma, beta=beta)
    return loss_curve(loss, x,
                      f'Balanced L1 (α={alpha:g}, γ={gamma:g}, β={beta:g})')


def smooth_l1_curve(x: np.ndarray, beta: float = 1.0) -> Curve:
    """MMDetection's ``SmoothL1Loss`` at ``x``.

    Raises:
        ValueError: ``beta`` is not finite and ``> 0`` (MMDetection's own
            check is an ``assert``).
    """
    check_positive('beta', beta)
    return loss_curve(SmoothL1Loss(beta=beta), x, f'Smooth L1 (β={beta:g})')


def l1_curve(x: np.ndarray) -> Curve:
    """MMDetection's ``L1Loss`` at ``x``."""
    return loss_curve(L1Loss(), x, 'L1')


def figure_curves(balanced: Sequence[Tuple[float, float,
                                           float]] = ((0.5, 1.5, 1.0), ),
                  smooth_l1_betas: Sequence[float] = (1.0, ),
                  l1: bool = True,
                  x_max: Optional[float] = None,
                  num: int = 1201) -> List[Curve]:
    """All curves of one figure, on one grid that contains every ``beta``.

    Args:
        balanced (Sequence[tuple]): ``(alpha, gamma, beta)`` of each Balanced
            L1 curve. Defaults to the paper's ``((0.5, 1.5, 1.0),)``.
        smooth_l1_betas (Sequence[float]): ``beta`` of each smooth L1 curve.
            Defaults to ``(1.0,)``.
        l1 (bool): Whether to add the L1 curve. Defaults to True.
        x_max (float, optional): Largest error. Defaults to None: three
            times the largest ``beta`` (3 for none).
        num (int): Evenly spaced points. Defaults to 1201.

    Returns:
        list[Curve]: Balanced L1 curves, then smooth L1, then L1.
    """
    betas = [b for _, _, b in balanced] + list(smooth_l1_betas)
    if x_max is None:
        x_max = 3.0 * max(betas, default=1.0)
    x = regression_errors(x_max, num, [b for b in betas if b <= x_max])
    curves = [balanced_l1_curve(x, a, g, b) for a, g, b in balanced]
    curves += [smooth_l1_curve(x, b) for b in smooth_l1_betas]
    if l1:
        curves.append(l1_curve(x))
    return curves
