import math
import re

import pytest
import torch
from mmdet.models.losses import BalancedL1Loss as MMDetBalancedL1Loss
from mmdet.registry import MODELS as MMDET_MODELS
from mmengine.config import Config
from mmengine.registry import DefaultScope, init_default_scope

from balanced_l1_plugin import BalancedL1Loss
from balanced_l1_plugin.models.losses.balanced_l1_loss import (
    balanced_l1_loss, inlier_scale)

PARAMS = [
    # alpha, gamma, beta
    (0.5, 1.5, 1.0),
    (0.5, 1.5, 0.11),
    (0.5, 1.5, 2.0),
    (0.2, 1.0, 1.0),
    (0.3, 1.0, 0.5),
    (0.5, 2.0, 1.0 / 9.0),
]


def reference_loss(x, alpha, gamma, beta):
    """The paper's loss for threshold beta, written from its equations."""
    b = math.exp(gamma / alpha) - 1
    ax = x.abs()
    inlier = alpha / b * (b * ax + beta) * torch.log(b * ax / beta + 1) \
        - alpha * ax
    outlier = gamma * ax + gamma * beta / b - alpha * beta
    return torch.where(ax < beta, inlier, outlier)


def reference_grad(x, alpha, gamma, beta):
    """The paper's gradient for threshold beta."""
    b = math.exp(gamma / alpha) - 1
    ax = x.abs()
    magnitude = torch.where(ax < beta, alpha * torch.log(1 + b * ax / beta),
                            torch.full_like(ax, gamma))
    return magnitude * torch.sign(x)


def errors(beta, n=257, dtype=torch.float64):
    """Errors covering 0, both sides of beta and far outliers."""
    x = torch.linspace(-4 * beta, 4 * beta, n, dtype=dtype)
    extra = torch.tensor([0.0, beta, -beta, 1e-6, 30.0, -100.0], dtype=dtype)
    return torch.cat([x, extra]).reshape(-1, 1).expand(-1, 4).contiguous()


def loss_and_grad(loss_fn, pred, target, **kwargs):
    pred = pred.clone().requires_grad_(True)
    loss = loss_fn(pred, target, **kwargs)
    loss.sum().backward()
    return loss.detach(), pred.grad


@pytest.mark.parametrize('alpha,gamma,beta', PARAMS)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_values_and_gradients_match_the_formula(alpha, gamma, beta, dtype):
    x = errors(beta, dtype=dtype)
    target = torch.rand_like(x) * 3
    loss_fn = BalancedL1Loss(alpha, gamma, beta, reduction='none')

    loss, grad = loss_and_grad(loss_fn, target + x, target)

    x64 = ((target + x) - target).double()
    atol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(
        loss.double(),
        reference_loss(x64, alpha, gamma, beta),
        rtol=1e-5,
        atol=atol)
    torch.testing.assert_close(
        grad.double(),
        reference_grad(x64, alpha, gamma, beta),
        rtol=1e-5,
        atol=atol)


@pytest.mark.parametrize('beta', [0.05, 0.11, 0.5, 1.0, 2.0, 7.0])
def test_gradcheck_float64(beta):
    torch.manual_seed(0)
    pred = (torch.randn(12, 4, dtype=torch.float64) * 2 * beta)
    pred.requires_grad_(True)
    target = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(12, 4, dtype=torch.float64)

    def fn(p, t):
        return balanced_l1_loss(
            p, t, weight, reduction='sum', alpha=0.5, gamma=1.5, beta=beta)

    assert torch.autograd.gradcheck(fn, (pred, target))


@pytest.mark.parametrize('alpha,gamma,beta', PARAMS)
def test_continuous_at_beta_and_flat_at_zero(alpha, gamma, beta):
    eps = 1e-9 * beta
    x = torch.tensor([beta - eps, beta, beta + eps, 0.0, -0.0],
                     dtype=torch.float64)
    loss_fn = BalancedL1Loss(alpha, gamma, beta, reduction='none')

    loss, grad = loss_and_grad(loss_fn, x, torch.zeros_like(x))

    assert abs(loss[0] - loss[2]) < 1e-7
    assert abs(grad[0] - gamma) < 1e-7
    assert grad[1] == pytest.approx(gamma)
    assert grad[2] == pytest.approx(gamma)
    assert loss[3] == 0 and loss[4] == 0
    assert grad[3] == 0 and grad[4] == 0


def test_gradient_never_exceeds_gamma():
    x = errors(1.0, n=10001).float()
    _, grad = loss_and_grad(
        BalancedL1Loss(reduction='none'), x, torch.zeros_like(x))
    assert grad.abs().max() <= 1.5 * (1 + 1e-6)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('reduction', ['none', 'mean', 'sum'])
@pytest.mark.parametrize('alpha,gamma', [(0.5, 1.5), (0.2, 1.0), (0.5, 2.0)])
def test_equals_mmdetection_at_beta_one(dtype, reduction, alpha, gamma):
    torch.manual_seed(1)
    pred = torch.randn(300, 4, dtype=dtype) * 2
    target = torch.randn(300, 4, dtype=dtype)
    weight = torch.rand(300, 4, dtype=dtype)
    ours = BalancedL1Loss(alpha, gamma, 1.0, reduction, loss_weight=2.0)
    theirs = MMDetBalancedL1Loss(alpha, gamma, 1.0, reduction, 2.0)

    loss, grad = loss_and_grad(ours, pred, target, weight=weight)
    ref_loss, ref_grad = loss_and_grad(theirs, pred, target, weight=weight)

    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(loss, ref_loss, **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)


@pytest.mark.parametrize('beta,mmdet_slope', [(0.11, 0.5 * (1 / 0.11 - 1)),
                                              (2.0, 0.5 * (1 / 2.0 - 1))])
def test_differs_from_mmdetection_where_it_is_wrong(beta, mmdet_slope):
    x = torch.tensor([1e-7, beta * (1 - 1e-6), beta * (1 + 1e-6)],
                     dtype=torch.float64)
    zero = torch.zeros_like(x)

    _, grad = loss_and_grad(
        BalancedL1Loss(beta=beta, reduction='none'), x, zero)
    _, ref_grad = loss_and_grad(
        MMDetBalancedL1Loss(beta=beta, reduction='none'), x, zero)

    # MMDetection's gradient near 0 is alpha * (1 / beta - 1), not 0, and
    # it jumps by alpha * (1 - beta) / (beta * (b + 1)) at beta; ours
    # starts at 0 and is continuous.
    b = inlier_scale(0.5, 1.5)
    assert ref_grad[0] == pytest.approx(mmdet_slope, rel=1e-3)
    assert ref_grad[1] - ref_grad[2] == pytest.approx(
        0.5 * (1 - beta) / (beta * (b + 1)), rel=1e-3)
    assert abs(grad[0]) < 1e-4
    assert grad[1] == pytest.approx(grad[2], rel=1e-5)


class TestReductionAndWeights:

    def setup_method(self):
        torch.manual_seed(2)
        self.pred = torch.randn(6, 4, dtype=torch.float64)
        self.target = torch.randn(6, 4, dtype=torch.float64)
        self.elementwise = reference_loss(self.pred - self.target, 0.5, 1.5,
                                          1.0)

    def test_reductions(self):
        loss_fn = BalancedL1Loss(loss_weight=3.0)
        p, t, e = self.pred, self.target, self.elementwise
        torch.testing.assert_close(loss_fn(p, t), 3 * e.mean())
        torch.testing.assert_close(
            loss_fn(p, t, reduction_override='sum'), 3 * e.sum())
        torch.testing.assert_close(
            loss_fn(p, t, reduction_override='none'), 3 * e)
        torch.testing.assert_close(
            BalancedL1Loss(reduction='sum')(p, t), e.sum())

    def test_avg_factor(self):
        loss_fn = BalancedL1Loss()
        torch.testing.assert_close(
            loss_fn(self.pred, self.target, avg_factor=5.0),
            self.elementwise.sum() / (5.0 + torch.finfo(torch.float32).eps))
        torch.testing.assert_close(
            loss_fn(
                self.pred,
                self.target,
                avg_factor=5.0,
                reduction_override='none'), self.elementwise)

    def test_elementwise_weight(self):
        weight = torch.rand(6, 4, dtype=torch.float64)
        loss = BalancedL1Loss(reduction='sum')(self.pred, self.target, weight)
        torch.testing.assert_close(loss, (self.elementwise * weight).sum())

    @pytest.mark.parametrize('shape', [(6, ), (6, 1)])
    def test_per_box_weight_broadcasts_over_coordinates(self, shape):
        box_weight = torch.arange(6, dtype=torch.float64)
        loss_fn = BalancedL1Loss(reduction='none')

        loss = loss_fn(self.pred, self.target, box_weight.reshape(shape))

        torch.testing.assert_close(loss,
                                   self.elementwise * box_weight[:, None])

    def test_per_box_weight_on_square_input_is_per_box(self):
        pred, target = self.pred[:4], self.target[:4]
        box_weight = torch.tensor([1.0, 0.0, 2.0, 0.0], dtype=torch.float64)

        loss = BalancedL1Loss(reduction='none')(pred, target, box_weight)

        torch.testing.assert_close(
            loss, self.elementwise[:4] * box_weight[:, None])

    @pytest.mark.parametrize('avg_factor', [None, 0.0, 4.0])
    def test_all_zero_weights(self, avg_factor):
        pred = self.pred.clone().requires_grad_(True)
        weight = torch.zeros(6, 4, dtype=torch.float64)

        loss = BalancedL1Loss()(pred, self.target, weight, avg_factor)
        loss.backward()

        assert loss.item() == 0
        assert torch.equal(pred.grad, torch.zeros_like(pred))

    @pytest.mark.parametrize('reduction', ['none', 'mean', 'sum'])
    @pytest.mark.parametrize('with_weight', [False, True])
    def test_empty_input_keeps_the_graph(self, reduction, with_weight):
        pred = torch.randn(0, 4, requires_grad=True)
        target = torch.randn(0, 4)
        weight = torch.ones(0, 4) if with_weight else None

        loss = BalancedL1Loss(reduction=reduction)(pred, target, weight)
        loss.sum().backward()

        expected_shape = (0, 4) if reduction == 'none' else ()
        assert loss.shape == expected_shape
        assert loss.sum().item() == 0
        assert pred.grad is not None and pred.grad.shape == (0, 4)

    def test_empty_input_with_avg_factor(self):
        pred = torch.randn(0, 4, requires_grad=True)
        loss = BalancedL1Loss()(pred, torch.randn(0, 4), avg_factor=0)
        loss.backward()
        assert loss.item() == 0 and pred.grad is not None

    def test_target_gradient_is_minus_pred_gradient(self):
        pred = self.pred.clone().requires_grad_(True)
        target = self.target.clone().requires_grad_(True)

        BalancedL1Loss()(pred, target).backward()

        torch.testing.assert_close(target.grad, -pred.grad)

    def test_no_grad_inference(self):
        with torch.no_grad():
            loss = BalancedL1Loss(reduction='none')(self.pred, self.target)
        torch.testing.assert_close(loss, self.elementwise)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('beta', [0.11, 1.0])
@pytest.mark.parametrize('reduction', ['mean', 'sum'])
def test_half_precision_is_finite_for_large_errors(dtype, beta, reduction):
    target = torch.zeros(8, 4, dtype=dtype)
    pred = torch.tensor([0.0, 1e-3, 0.05, beta, 3.0, 100.0, 1e3, 1e4],
                        dtype=dtype)[:, None].expand(-1, 4).contiguous()
    pred.requires_grad_(True)

    loss = BalancedL1Loss(beta=beta, reduction=reduction)(pred, target)
    loss.backward()

    assert torch.isfinite(loss)
    assert pred.grad.dtype == dtype
    assert torch.isfinite(pred.grad).all()
    expected = BalancedL1Loss(
        beta=beta, reduction=reduction)(pred.detach().float(),
                                        target.float())
    torch.testing.assert_close(loss.float(), expected, rtol=1e-5, atol=1e-5)
    assert pred.grad.float().abs().max() <= 1.5 * 1.01


@pytest.mark.parametrize('name', ['alpha', 'gamma', 'beta'])
@pytest.mark.parametrize('value', [0, -1.0, float('nan'), float('inf')])
def test_bad_parameters_fail_at_construction(name, value):
    with pytest.raises(ValueError, match=f'{name} must be finite and > 0'):
        BalancedL1Loss(**{name: value})


@pytest.mark.parametrize('name', ['alpha', 'gamma', 'beta'])
@pytest.mark.parametrize('value', ['0.5', None, True])
def test_non_numeric_parameters_fail_at_construction(name, value):
    with pytest.raises(TypeError, match=f'{name} must be a real number'):
        BalancedL1Loss(**{name: value})


@pytest.mark.parametrize('value', [-1.0, float('nan'), 'x'])
def test_bad_loss_weight(value):
    with pytest.raises(ValueError, match='loss_weight'):
        BalancedL1Loss(loss_weight=value)


def test_unknown_reduction():
    with pytest.raises(ValueError, match="reduction must be one of.*'avg'"):
        BalancedL1Loss(reduction='avg')
    with pytest.raises(ValueError, match="reduction_override.*'avg'"):
        BalancedL1Loss()(
            torch.zeros(2, 4), torch.zeros(2, 4), reduction_override='avg')


def test_avg_factor_with_sum():
    with pytest.raises(ValueError, match='avg_factor=3'):
        BalancedL1Loss(reduction='sum')(
            torch.zeros(2, 4), torch.zeros(2, 4), avg_factor=3)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r'pred \(2, 4\).*target \(3, 4\)'):
        BalancedL1Loss()(torch.zeros(2, 4), torch.zeros(3, 4))


@pytest.mark.parametrize('shape', [(3, ), (2, 3), (4, 2, 4)])
def test_weight_that_cannot_broadcast(shape):
    message = re.escape(f'weight of shape {shape}')
    with pytest.raises(ValueError, match=message):
        BalancedL1Loss()(torch.zeros(2, 4), torch.zeros(2, 4),
                         torch.ones(shape))


@pytest.mark.parametrize('which', ['pred', 'target'])
def test_integer_tensors_are_rejected(which):
    tensors = dict(pred=torch.zeros(2, 4), target=torch.zeros(2, 4))
    tensors[which] = tensors[which].long()
    with pytest.raises(TypeError, match=f'{which} must be a floating-point'):
        BalancedL1Loss()(**tensors)


def test_b_is_fixed_by_alpha_and_gamma():
    assert BalancedL1Loss().b == pytest.approx(19.0855, abs=1e-4)
    assert 0.5 * math.log(inlier_scale(0.5, 1.5) + 1) == pytest.approx(1.5)


class TestRegistry:

    def test_built_from_a_config_through_mmdetection(self):
        cfg = Config(
            dict(
                custom_imports=dict(
                    imports=['balanced_l1_plugin'],
                    allow_failed_imports=False),
                loss_bbox=dict(
                    type='balanced_l1_plugin.BalancedL1Loss',
                    alpha=0.3,
                    gamma=1.0,
                    beta=0.11,
                    loss_weight=2.0)))
        init_default_scope('mmdet')

        loss = MMDET_MODELS.build(cfg.loss_bbox)

        assert type(loss) is BalancedL1Loss
        assert (loss.alpha, loss.gamma, loss.beta,
                loss.loss_weight) == (0.3, 1.0, 0.11, 2.0)

    def test_mmdetection_loss_stays_registered(self):
        with DefaultScope.overwrite_default_scope('mmdet'):
            theirs = MMDET_MODELS.build(dict(type='BalancedL1Loss'))
            ours = MMDET_MODELS.build(
                dict(type='balanced_l1_plugin.BalancedL1Loss'))
        assert type(theirs) is MMDetBalancedL1Loss
        assert type(ours) is BalancedL1Loss

    def test_bad_config_fails_when_built(self):
        with DefaultScope.overwrite_default_scope('mmdet'):
            with pytest.raises(ValueError, match='beta must be finite'):
                MMDET_MODELS.build(
                    dict(type='balanced_l1_plugin.BalancedL1Loss', beta=-1))
