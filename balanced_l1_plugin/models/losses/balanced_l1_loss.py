# Copyright (c) balanced_l1_plugin authors. All rights reserved.
r"""Balanced L1 Loss of Libra R-CNN, scaled correctly for every ``beta``.

Paper: Pang et al., *Libra R-CNN: Towards Balanced Learning for Object
Detection*, CVPR 2019, https://arxiv.org/abs/1904.02701.
"""
import math
import numbers
from typing import Optional, Tuple

import torch
import torch.nn as nn
from mmdet.models.losses.utils import weighted_loss
from torch import Tensor
from torch.autograd.function import once_differentiable

from balanced_l1_plugin.registry import MODELS

REDUCTIONS = ('none', 'mean', 'sum')

# Half-precision inputs are computed in float32, as autocast does for
# PyTorch's own regression losses: ``b * |x| / beta`` overflows float16 for
# errors far below 1e4, and the cancellation near 0 would lose all digits.
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_positive(name: str, value: float) -> float:
    """Return ``value`` as a float if it is a finite number above 0.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is not finite or ``<= 0``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f'{name} must be a real number, got {value!r} of type '
            f'{type(value).__name__}')
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f'{name} must be finite and > 0, got {value!r}')
    return float(value)


def check_reduction(name: str, reduction: Optional[str]) -> None:
    """Raise ``ValueError`` unless ``reduction`` is a known reduction."""
    if reduction not in REDUCTIONS:
        raise ValueError(
            f'{name} must be one of {REDUCTIONS}, got {reduction!r}')


def inlier_scale(alpha: float, gamma: float) -> float:
    """The paper's ``b``, fixed by ``alpha * ln(b + 1) = gamma``."""
    return math.expm1(gamma / alpha)


def _compute_dtype(pred: Tensor, target: Tensor) -> torch.dtype:
    dtype = torch.promote_types(pred.dtype, target.dtype)
    return torch.float32 if dtype in _HALF_DTYPES else dtype


# Elements per block of the blocked computation: the few temporaries of a
# block (256 KiB each in float32) stay in a core's L2 cache, and a block is
# two of ATen's parallel grains, so both threads of a small machine work.
_BLOCK = 1 << 16


def _loss_and_grad(pred: Tensor, target: Tensor, alpha: float, gamma: float,
                   beta: float,
                   need_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Element-wise loss and its derivative with respect to ``pred``.

    Uses ``a = min(|x|, beta)``: the loss is the inlier branch at ``a`` plus
    ``gamma * (|x| - a)``, and the derivative is ``alpha * ln(1 + b a /
    beta) * sign(x)`` for both branches, because ``alpha * ln(1 + b) =
    gamma``. That removes the branch selection and every mask.

    The work runs block by block with reused temporaries, writing the loss
    into one new tensor and the derivative over the difference ``x``: the
    peak is two tensors of the input's size, and each block's passes hit
    the cache instead of main memory (on the CPU).
    """
    b = inlier_scale(alpha, gamma)
    dtype = _compute_dtype(pred, target)

    diff = torch.sub(pred.to(dtype), target.to(dtype)).contiguous()
    loss = torch.empty_like(diff)
    flat_diff, flat_loss = diff.view(-1), loss.view(-1)
    numel = flat_diff.numel()
    # On a GPU each block costs kernel launches and there is no cache to
    # keep, so the whole tensor is one block there.
    block = _BLOCK if diff.device.type == 'cpu' else numel
    block = max(1, min(block, numel))
    buffers = torch.empty((3, block), dtype=dtype, device=diff.device)

    for start in range(0, numel, block):
        stop = min(start + block, numel)
        x = flat_diff[start:stop]
        out = flat_loss[start:stop]
        abs_x, a, grad_mag = buffers[:, :stop - start]

        torch.abs(x, out=abs_x)
        torch.clamp_max(abs_x, beta, out=a)

        # alpha * ln(1 + b * a / beta): the magnitude of the gradient.
        torch.mul(a, b / beta, out=grad_mag)
        grad_mag.log1p_().mul_(alpha)

        # alpha / b * (b * a + beta) * ln(1 + b * a / beta) - alpha * a
        #     + gamma * (|x| - a)
        torch.add(a, beta / b, out=out)
        out.mul_(grad_mag).add_(abs_x, alpha=gamma)
        out.sub_(a, alpha=alpha + gamma)

        if need_grad:
            torch.copysign(grad_mag, x, out=x)

    return loss, (diff if need_grad else None)


class _BalancedL1Function(torch.autograd.Function):
    """Element-wise Balanced L1 with an analytic backward.

    The forward pass computes the derivative alongside the loss (they share
    the logarithm) and saves only that one tensor for the backward pass.
    """

    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor, alpha: float,
                gamma: float, beta: float) -> Tensor:
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, grad = _loss_and_grad(pred, target, alpha, gamma, beta,
                                    need_grad)
        ctx.pred_dtype = pred.dtype
        ctx.target_dtype = target.dtype
        if need_grad:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        grad, = ctx.saved_tensors
        grad_diff = grad_loss * grad
        grad_pred = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_pred = grad_diff.to(ctx.pred_dtype)
        if ctx.needs_input_grad[1]:
            grad_target = torch.neg(grad_diff).to(ctx.target_dtype)
        return grad_pred, grad_target, None, None, None


@weighted_loss
def balanced_l1_loss(pred: Tensor,
                     target: Tensor,
                     alpha: float = 0.5,
                     gamma: float = 1.5,
                     beta: float = 1.0) -> Tensor:
    r"""Element-wise Balanced L1 Loss, for any threshold ``beta > 0``.

    Decorated with MMDetection's ``weighted_loss``, so it also takes
    ``weight``, ``reduction`` and ``avg_factor``. Arguments are not checked
    here; :class:`BalancedL1Loss` checks them.

    Args:
        pred (Tensor): Predicted regression values, any shape.
        target (Tensor): Regression targets, the shape of ``pred``.
        alpha (float): Inlier gradient scale. Defaults to 0.5.
        gamma (float): Outlier gradient (the bound). Defaults to 1.5.
        beta (float): Threshold between inliers and outliers.
            Defaults to 1.0.

    Returns:
        Tensor: The element-wise loss, float32 for half-precision inputs.
    """
    return _BalancedL1Function.apply(pred, target, alpha, gamma, beta)


@MODELS.register_module()
class BalancedL1Loss(nn.Module):
    r"""Balanced L1 Loss (Libra R-CNN), correct for every ``beta``.

    With :math:`x` = ``pred - target`` and :math:`b = e^{\gamma/\alpha} - 1`
    (so that :math:`\alpha \ln(b + 1) = \gamma`), the gradient is the
    paper's, written for a threshold :math:`\beta`:

    .. math::

        \frac{\partial L_\beta}{\partial x} =
        \begin{cases}
            \alpha \ln(1 + b|x|/\beta)\,\mathrm{sign}(x) & |x| < \beta \\
            \gamma\,\mathrm{sign}(x) & \text{otherwise}
        \end{cases}

    and the loss is :math:`L_\beta(x) = \beta L_1(x / \beta)`, where
    :math:`L_1` is the paper's Eq. (8)/(9) for threshold 1:

    .. math::

        L_\beta(x) =
        \begin{cases}
            \frac{\alpha}{b}(b|x| + \beta)\ln(1 + b|x|/\beta) - \alpha|x|
                & |x| < \beta \\
            \gamma|x| + \gamma\beta/b - \alpha\beta & \text{otherwise}
        \end{cases}

    The value and the gradient are continuous at :math:`|x| = \beta`, the
    gradient is 0 at :math:`x = 0`, and the gradient never exceeds
    :math:`\gamma`.

    Note:
        MMDetection's ``BalancedL1Loss`` uses :math:`(b|x| + 1)` in place of
        :math:`(b|x| + \beta)` and :math:`\gamma/b` in place of
        :math:`\gamma\beta/b`. The two agree at ``beta = 1`` (this class
        matches it there to float precision, values and gradients), but for
        any other ``beta`` MMDetection's gradient at :math:`x \to 0` is
        :math:`\alpha(1/\beta - 1)` instead of 0 (about 4.0 at
        ``beta = 0.11``, the value of its Libra RetinaNet config, and
        negative for ``beta > 1``) and it jumps at :math:`|x| = \beta`.

    Note:
        Half-precision inputs (``float16``, ``bfloat16``) are computed in
        float32 and the loss is returned in float32, as autocast does for
        PyTorch's own regression losses; gradients come back in the dtype
        of each input. The backward pass is analytic and not differentiable
        again (no double backward).

    Args:
        alpha (float): Scale of the inlier gradient. Defaults to 0.5.
        gamma (float): Bound of the gradient, reached at
            ``|x| >= beta``. Defaults to 1.5.
        beta (float): Threshold between inliers and outliers.
            Defaults to 1.0.
        reduction (str): ``'none'``, ``'mean'`` or ``'sum'``.
            Defaults to ``'mean'``.
        loss_weight (float): Multiplier of the loss. Defaults to 1.0.

    Raises:
        ValueError: ``alpha``, ``gamma`` or ``beta`` is not finite or
            ``<= 0``, ``loss_weight`` is not finite or ``< 0``, or
            ``reduction`` is unknown.
        TypeError: a parameter is not a real number.

    Example:
        >>> loss = BalancedL1Loss(alpha=0.5, gamma=1.5, beta=1.0)
        >>> pred = torch.tensor([[0.0, 0.5, 1.0, 3.0]], requires_grad=True)
        >>> loss(pred, torch.zeros(1, 4), reduction_override='none').detach()
        tensor([[0.0000, 0.4006, 1.0786, 4.0786]])
    """

    def __init__(self,
                 alpha: float = 0.5,
                 gamma: float = 1.5,
                 beta: float = 1.0,
                 reduction: str = 'mean',
                 loss_weight: float = 1.0) -> None:
        super().__init__()
        self.alpha = check_positive('alpha', alpha)
        self.gamma = check_positive('gamma', gamma)
        self.beta = check_positive('beta', beta)
        check_reduction('reduction', reduction)
        self.reduction = reduction
        if (isinstance(loss_weight, bool)
                or not isinstance(loss_weight, numbers.Real)
                or not math.isfinite(loss_weight) or loss_weight < 0):
            raise ValueError(
                f'loss_weight must be a finite number >= 0, got '
                f'{loss_weight!r}')
        self.loss_weight = float(loss_weight)

    @property
    def b(self) -> float:
        """The paper's ``b = e^(gamma / alpha) - 1``."""
        return inlier_scale(self.alpha, self.gamma)

    def forward(self,
                pred: Tensor,
                target: Tensor,
                weight: Optional[Tensor] = None,
                avg_factor: Optional[float] = None,
                reduction_override: Optional[str] = None,
                **kwargs) -> Tensor:
        """Compute the loss.

        Args:
            pred (Tensor): Predictions, usually of shape (N, 4).
            target (Tensor): Targets, the shape of ``pred``.
            weight (Tensor, optional): Element-wise weight of the shape of
                ``pred``, or a per-box weight of shape (N,) or (N, 1) that
                is broadcast over the last dimension. Defaults to None.
            avg_factor (float, optional): Divisor of the summed loss for
                ``'mean'``. Defaults to None.
            reduction_override (str, optional): Replaces ``reduction`` for
                this call. Defaults to None.

        Returns:
            Tensor: A scalar for ``'mean'`` and ``'sum'``, else the
            element-wise loss.
        """
        if reduction_override is not None:
            check_reduction('reduction_override', reduction_override)
        reduction = reduction_override or self.reduction
        if avg_factor is not None and reduction == 'sum':
            raise ValueError(
                f'avg_factor cannot be used with reduction="sum", got '
                f'avg_factor={avg_factor!r}')
        _check_inputs(pred, target)
        weight = _broadcast_weight(weight, pred)

        if pred.numel() == 0 and reduction == 'mean' and avg_factor is None:
            # The mean of nothing is NaN; a zero that keeps the graph lets
            # backward run on images without boxes.
            return pred.sum() * 0 * self.loss_weight

        loss = balanced_l1_loss(
            pred,
            target,
            weight,
            alpha=self.alpha,
            gamma=self.gamma,
            beta=self.beta,
            reduction=reduction,
            avg_factor=avg_factor)
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return (f'alpha={self.alpha}, gamma={self.gamma}, beta={self.beta}, '
                f'reduction={self.reduction!r}, '
                f'loss_weight={self.loss_weight}')


def _check_inputs(pred: Tensor, target: Tensor) -> None:
    for name, tensor in (('pred', pred), ('target', target)):
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f'{name} must be a torch.Tensor, got {type(tensor).__name__}')
        if not tensor.is_floating_point():
            raise TypeError(
                f'{name} must be a floating-point tensor, got dtype '
                f'{tensor.dtype}')
    if pred.shape != target.shape:
        raise ValueError(
            f'pred and target must have the same shape, got pred '
            f'{tuple(pred.shape)} and target {tuple(target.shape)}')


def _broadcast_weight(weight: Optional[Tensor],
                      pred: Tensor) -> Optional[Tensor]:
    """Return ``weight`` in a shape that multiplies the element-wise loss."""
    if weight is None:
        return None
    if not isinstance(weight, Tensor):
        raise TypeError(
            f'weight must be a torch.Tensor or None, got '
            f'{type(weight).__name__}')
    if weight.is_complex():
        raise TypeError(f'weight must be real, got dtype {weight.dtype}')
    if pred.dim() > 0 and weight.shape == pred.shape[:-1]:
        # A per-box weight (N,) applies to all coordinates of its box.
        weight = weight.unsqueeze(-1)
    try:
        shape = torch.broadcast_shapes(weight.shape, pred.shape)
    except RuntimeError:
        shape = None
    if shape != pred.shape:
        raise ValueError(
            f'weight of shape {tuple(weight.shape)} cannot be broadcast to '
            f'pred of shape {tuple(pred.shape)}')
    return weight
