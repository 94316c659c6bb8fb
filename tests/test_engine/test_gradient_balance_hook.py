# Copyright (c) balanced_l1_plugin authors. All rights reserved.
import json
import math
import uuid
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from mmdet.models.losses import BalancedL1Loss as MMDetBalancedL1Loss
from mmdet.models.losses import L1Loss, SmoothL1Loss
from mmdet.registry import HOOKS as MMDET_HOOKS
from mmengine.logging import MessageHub

from balanced_l1_plugin.engine.hooks import RegressionGradientHook
from balanced_l1_plugin.models.losses import BalancedL1Loss

# x = pred - target of eight elements; two carry weight 0 and are no
# samples. ``WEIGHT`` scales two samples so that a hook ignoring weights
# would get different means.
PRED = [[0.5, -0.25, 2.0, -3.0], [0.0, 0.8, -0.1, 7.0]]
TARGET = [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
WEIGHT = [[1.0, 1.0, 2.0, 1.0], [0.0, 0.5, 1.0, 0.0]]
AVG_FACTOR = 5.0
LOSS_WEIGHT = 2.0


def balanced_grad(x, alpha, gamma, beta):
    """|dL/dx| of Balanced L1, written from the paper's Eq. (7)."""
    b = math.exp(gamma / alpha) - 1
    return alpha * math.log(1 + b * abs(x) / beta) if abs(x) < beta \
        else gamma


def smooth_l1_grad(x, beta):
    return abs(x) / beta if abs(x) < beta else 1.0


def hand_numbers(grad_fn, beta):
    """The four numbers of the hook, from the lists above by hand."""
    inlier_grads, outlier_grads = [], []
    for pred_row, target_row, weight_row in zip(PRED, TARGET, WEIGHT):
        for p, t, w in zip(pred_row, target_row, weight_row):
            if w == 0:
                continue
            grad = LOSS_WEIGHT * w * grad_fn(p - t) / AVG_FACTOR
            (inlier_grads if abs(p - t) < beta else outlier_grads).append(grad)
    n = len(inlier_grads) + len(outlier_grads)
    total = sum(inlier_grads) + sum(outlier_grads)
    return {
        'reg_grad/inlier_ratio': len(inlier_grads) / n,
        'reg_grad/inlier_grad_mean': sum(inlier_grads) / len(inlier_grads),
        'reg_grad/outlier_grad_mean': sum(outlier_grads) / len(outlier_grads),
        'reg_grad/inlier_grad_share': sum(inlier_grads) / total,
    }


CASES = [
    (BalancedL1Loss(0.5, 1.5, 1.0, loss_weight=LOSS_WEIGHT), 1.0,
     lambda x: balanced_grad(x, 0.5, 1.5, 1.0), 1.0),
    (BalancedL1Loss(0.3, 1.2, 0.6, loss_weight=LOSS_WEIGHT), 1.0,
     lambda x: balanced_grad(x, 0.3, 1.2, 0.6), 0.6),
    (MMDetBalancedL1Loss(0.5, 1.5, 1.0, loss_weight=LOSS_WEIGHT), 1.0,
     lambda x: balanced_grad(x, 0.5, 1.5, 1.0), 1.0),
    (SmoothL1Loss(beta=0.9, loss_weight=LOSS_WEIGHT), 1.0,
     lambda x: smooth_l1_grad(x, 0.9), 0.9),
    # L1Loss has no beta: the hook's own beta (0.6 here) decides.
    (L1Loss(loss_weight=LOSS_WEIGHT), 0.6, lambda x: 1.0, 0.6),
]
CASE_IDS = ['plugin', 'plugin-beta0.6', 'mmdet-balanced', 'smooth-l1', 'l1']


class ToyModel(nn.Module):
    """A model whose only loss is ``loss_bbox`` on a parameter ``pred``."""

    def __init__(self, loss_bbox, split=False, extra_use=False):
        super().__init__()
        self.pred = nn.Parameter(torch.tensor(PRED))
        self.loss_bbox = loss_bbox
        self.split = split
        self.extra_use = extra_use
        self.saw_wrapped_forward = []

    def forward(self, weight):
        self.saw_wrapped_forward.append('forward' in self.loss_bbox.__dict__)
        pred = self.pred * 1.0
        target = torch.tensor(TARGET)
        if self.split:
            # Two calls in one iteration, like two FPN levels.
            loss = sum(
                self.loss_bbox(
                    pred[i:i + 1],
                    target[i:i + 1],
                    weight[i:i + 1],
                    avg_factor=AVG_FACTOR) for i in range(2))
        else:
            loss = self.loss_bbox(
                pred, target, weight=weight, avg_factor=AVG_FACTOR)
        if self.extra_use:
            # Another use of ``pred`` whose gradient is not the loss's.
            loss = loss + (pred**2).sum()
        return loss


def make_runner(model):
    hub = MessageHub.get_instance(f'test_reg_grad_{uuid.uuid4().hex}')
    return SimpleNamespace(model=model, message_hub=hub, hooks=[])


def train_iter(hook, runner, batch_idx, weight=None, scale=1.0):
    """One iteration as the train loop runs it, ``scale`` like AMP's."""
    model = runner.model
    if weight is None:
        weight = torch.tensor(WEIGHT)
    hook.before_train_iter(runner, batch_idx=batch_idx)
    model.zero_grad()
    loss = model(weight)
    (loss * scale).backward()
    hook.after_train_iter(runner, batch_idx=batch_idx)


def logged(runner):
    return {
        key.partition('/')[2]: buffer.current()
        for key, buffer in runner.message_hub.log_scalars.items()
        if key.startswith('train/reg_grad/')
    }


@pytest.mark.parametrize('loss,hook_beta,grad_fn,beta', CASES, ids=CASE_IDS)
def test_numbers_match_hand_computation(loss, hook_beta, grad_fn, beta):
    runner = make_runner(ToyModel(loss))
    hook = RegressionGradientHook(interval=1, beta=hook_beta)
    hook.before_train(runner)

    train_iter(hook, runner, batch_idx=0)

    expected = hand_numbers(grad_fn, beta)
    assert logged(runner) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('dtype,rel', [(torch.float64, 1e-6),
                                       (torch.float16, 2e-3),
                                       (torch.bfloat16, 2e-2)])
def test_numbers_in_other_dtypes(dtype, rel):
    model = ToyModel(BalancedL1Loss(0.5, 1.5, 1.0, loss_weight=LOSS_WEIGHT))
    model.pred.data = model.pred.data.to(dtype)
    runner = make_runner(model)
    hook = RegressionGradientHook(interval=1)

    train_iter(hook, runner, batch_idx=0)

    expected = hand_numbers(lambda x: balanced_grad(x, 0.5, 1.5, 1.0), 1.0)
    assert logged(runner) == pytest.approx(expected, rel=rel)


def test_call_without_samples_logs_nothing():
    runner = make_runner(ToyModel(BalancedL1Loss()))
    hook = RegressionGradientHook(interval=1)
    hook.before_train_iter(runner, batch_idx=0)
    pred = runner.model.pred[:0] * 1.0
    runner.model.loss_bbox(pred, torch.zeros_like(pred)).backward()
    hook.after_train_iter(runner, batch_idx=0)

    assert logged(runner) == {}


def test_hand_values_are_what_the_case_claims():
    # The inputs put 4 of 6 samples inside beta=1; a change of PRED that
    # lost this would weaken every test above.
    numbers = hand_numbers(lambda x: balanced_grad(x, 0.5, 1.5, 1.0), 1.0)
    assert numbers['reg_grad/inlier_ratio'] == pytest.approx(4 / 6)
    assert numbers['reg_grad/outlier_grad_mean'] == pytest.approx(
        LOSS_WEIGHT * (2 * 1.5 + 1.5) / AVG_FACTOR / 2)


@pytest.mark.parametrize(
    'split,extra_use,scale', [(True, False, 1.0), (False, True, 1.0),
                              (False, False, 1024.0), (True, True, 0.25)],
    ids=['two-calls', 'pred-used-elsewhere', 'amp-scale', 'all'])
def test_numbers_ignore_what_is_outside_the_loss(split, extra_use, scale):
    loss = BalancedL1Loss(0.5, 1.5, 1.0, loss_weight=LOSS_WEIGHT)
    runner = make_runner(ToyModel(loss, split=split, extra_use=extra_use))
    hook = RegressionGradientHook(interval=1)

    train_iter(hook, runner, batch_idx=0, scale=scale)

    expected = hand_numbers(lambda x: balanced_grad(x, 0.5, 1.5, 1.0), 1.0)
    assert logged(runner) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('weight,inliers,samples', [
    (None, 5, 8),
    (torch.tensor([1.0, 0.0]), 2, 4),
    (torch.tensor([[0.0], [1.0]]), 3, 4),
])
def test_samples_follow_weight_shape(weight, inliers, samples):
    # The plugin's loss takes per-box weights of shape (N,); MMDetection's
    # SmoothL1Loss would not.
    runner = make_runner(ToyModel(BalancedL1Loss(beta=1.0)))
    hook = RegressionGradientHook(interval=1)
    hook.before_train_iter(runner, batch_idx=0)
    runner.model.zero_grad()
    pred = runner.model.pred * 1.0
    runner.model.loss_bbox(pred, torch.zeros_like(pred), weight).backward()
    hook.after_train_iter(runner, batch_idx=0)

    assert logged(runner)['reg_grad/inlier_ratio'] == pytest.approx(inliers /
                                                                    samples)


def test_off_iterations_leave_the_loss_alone():
    loss = BalancedL1Loss(loss_weight=LOSS_WEIGHT)
    model = ToyModel(loss)
    runner = make_runner(model)
    hook = RegressionGradientHook(interval=3)
    class_forward = type(loss).forward

    for batch_idx in range(6):
        train_iter(hook, runner, batch_idx=batch_idx)
        assert 'forward' not in loss.__dict__
        assert loss.forward.__func__ is class_forward
        if batch_idx == 1:
            assert logged(runner) == {}

    # Recorded are batch_idx 2 and 5, as LoggerHook counts them.
    assert model.saw_wrapped_forward == [
        False, False, True, False, False, True
    ]
    buffer = runner.message_hub.get_scalar('train/reg_grad/inlier_ratio')
    assert len(buffer.data[0]) == 2


def test_own_forward_attribute_is_restored():
    loss = SmoothL1Loss()
    own = loss.forward
    loss.forward = own  # e.g. put there by another tool
    runner = make_runner(ToyModel(loss))
    hook = RegressionGradientHook(interval=1)

    train_iter(hook, runner, batch_idx=0)

    assert loss.__dict__['forward'] is own
    assert logged(runner)['reg_grad/inlier_ratio'] == pytest.approx(4 / 6)


def test_no_grad_calls_are_not_recorded():
    runner = make_runner(ToyModel(SmoothL1Loss()))
    hook = RegressionGradientHook(interval=1)
    hook.before_train_iter(runner, batch_idx=0)
    with torch.no_grad():
        runner.model(torch.tensor(WEIGHT))
    hook.after_train_iter(runner, batch_idx=0)

    assert logged(runner) == {}


class TwoStage(nn.Module):

    def __init__(self):
        super().__init__()
        self.rpn_head = nn.Module()
        self.rpn_head.loss_bbox = L1Loss()
        self.roi_head = nn.Module()
        self.roi_head.bbox_head = nn.ModuleList(
            [nn.Module() for _ in range(3)])
        for i, head in enumerate(self.roi_head.bbox_head):
            head.loss_bbox = SmoothL1Loss(beta=1.0 / (i + 1))
        self.roi_head.bbox_head[2].loss_bbox = nn.MSELoss()


@pytest.mark.parametrize('loss_paths,names', [
    (None,
     ['roi_head.bbox_head.0.loss_bbox', 'roi_head.bbox_head.1.loss_bbox']),
    (['rpn_head.loss_bbox', 'roi_head.bbox_head.[01].*'], [
        'roi_head.bbox_head.0.loss_bbox', 'roi_head.bbox_head.1.loss_bbox',
        'rpn_head.loss_bbox'
    ]),
])
def test_find_losses(loss_paths, names):
    model = TwoStage()
    hook = RegressionGradientHook(loss_paths=loss_paths)

    found = hook.find_losses(model)
    wrapped = hook.find_losses(nn.DataParallel(model))

    assert [name for name, _ in found] == names
    assert [name for name, _ in wrapped] == names


def test_find_losses_without_roi_head_takes_all_loss_bbox():
    model = TwoStage()
    del model.roi_head
    assert RegressionGradientHook().find_losses(model)[0][0] == \
        'rpn_head.loss_bbox'


@pytest.mark.parametrize('loss_paths,error,match', [
    (['neck.loss_bbox'], ValueError, 'matches no module'),
    (['roi_head.bbox_head.2.loss_bbox'], TypeError, 'MSELoss'),
])
def test_find_losses_rejects_bad_paths(loss_paths, error, match):
    hook = RegressionGradientHook(loss_paths=loss_paths)
    with pytest.raises(error, match=match):
        hook.find_losses(TwoStage())


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(interval=0), ValueError, 'interval must be >= 1, got 0'),
    (dict(interval=2.0), TypeError, 'interval must be an int'),
    (dict(interval=True), TypeError, 'interval must be an int'),
    (dict(beta=0.0), ValueError, 'beta must be finite and > 0'),
    (dict(beta=float('nan')), ValueError, 'beta must be finite'),
    (dict(beta='1'), TypeError, 'beta must be a real number'),
    (dict(loss_paths='loss_bbox'), TypeError, 'loss_paths must be'),
    (dict(loss_paths=[1]), TypeError, 'loss_paths must be'),
    (dict(loss_paths=5), TypeError, 'loss_paths must be'),
])
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        RegressionGradientHook(**kwargs)


@pytest.mark.parametrize('totals,expected', [
    ((0, 0, 0.0, 0.0), {}),
    ((0, 2, 0.0, 3.0), {
        'reg_grad/inlier_ratio': 0.0,
        'reg_grad/outlier_grad_mean': 1.5,
        'reg_grad/inlier_grad_share': 0.0
    }),
    ((4, 0, 0.0, 0.0), {
        'reg_grad/inlier_ratio': 1.0,
        'reg_grad/inlier_grad_mean': 0.0
    }),
    ((1, 3, 1.0, 3.0), {
        'reg_grad/inlier_ratio': 0.25,
        'reg_grad/inlier_grad_mean': 1.0,
        'reg_grad/outlier_grad_mean': 1.0,
        'reg_grad/inlier_grad_share': 0.25
    }),
])
def test_undefined_numbers_are_not_logged(totals, expected):
    assert RegressionGradientHook.compute_scalars(totals) == expected


def test_registered_in_plugin_scope():
    hook = MMDET_HOOKS.build(
        dict(type='balanced_l1_plugin.RegressionGradientHook', interval=7))
    assert isinstance(hook, RegressionGradientHook)
    assert hook.interval == 7


@pytest.mark.slow
@pytest.mark.parametrize(
    'loss_bbox,loss_paths', [
        (None, None),
        (dict(type='SmoothL1Loss', beta=1.0, loss_weight=1.0),
         ['rpn_head.loss_bbox', 'roi_head.bbox_head.loss_bbox']),
    ],
    ids=['plugin-roi-head', 'smooth-l1-rpn-and-roi'])
def test_training_run_writes_scalars(tmp_path, loss_bbox, loss_paths):
    from mmengine.runner import Runner

    from balanced_l1_plugin.analysis.tiny_detector import (
        RandomDetectionDataset, tiny_faster_rcnn)

    runner = Runner(
        model=tiny_faster_rcnn(loss_bbox=loss_bbox),
        work_dir=str(tmp_path),
        experiment_name=f'reg_grad_{uuid.uuid4().hex}',
        train_dataloader=dict(
            batch_size=2,
            num_workers=0,
            dataset=RandomDetectionDataset(num_images=4, image_size=96),
            sampler=dict(type='InfiniteSampler', shuffle=False),
            collate_fn=dict(type='pseudo_collate')),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=4),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.002, momentum=0.9)),
        default_hooks=dict(
            logger=dict(type='LoggerHook', interval=2), checkpoint=None),
        custom_hooks=[
            dict(
                type='balanced_l1_plugin.RegressionGradientHook',
                interval=2,
                loss_paths=loss_paths)
        ],
        default_scope='mmdet')
    runner.train()

    scalar_files = list(tmp_path.glob('*/vis_data/scalars.json'))
    assert len(scalar_files) == 1
    entries = [
        json.loads(line) for line in scalar_files[0].read_text().splitlines()
    ]
    recorded = [e for e in entries if 'reg_grad/inlier_ratio' in e]
    assert [e['step'] for e in recorded] == [2, 4]
    for entry in recorded:
        assert 0.0 <= entry['reg_grad/inlier_ratio'] <= 1.0
        assert 0.0 <= entry['reg_grad/inlier_grad_share'] <= 1.0
        present = [
            k for k in ('reg_grad/inlier_grad_mean',
                        'reg_grad/outlier_grad_mean') if k in entry
        ]
        assert present
        assert all(entry[k] > 0 for k in present)
    for _, module in runner.model.named_modules():
        assert 'forward' not in module.__dict__


def _dist_worker(rank, port, result_file):
    """Rank ``rank`` of a two-process gloo group; writes its numbers."""
    import os

    import torch.distributed as torch_dist
    from mmengine.model import MMDistributedDataParallel

    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch_dist.init_process_group('gloo', rank=rank, world_size=2)
    # Rank 0 holds the first row of PRED as samples, rank 1 the second
    # (weight 0 elsewhere); pooled, they are the single-process case.
    weight = torch.tensor(WEIGHT)
    weight[1 - rank] = 0.0
    model = MMDistributedDataParallel(
        ToyModel(BalancedL1Loss(0.5, 1.5, 1.0, loss_weight=LOSS_WEIGHT)))
    runner = make_runner(model)
    hook = RegressionGradientHook(interval=1)
    hook.before_train(runner)
    hook.before_train_iter(runner, batch_idx=0)
    model(weight).backward()
    hook.after_train_iter(runner, batch_idx=0)
    with open(f'{result_file}.{rank}', 'w') as f:
        json.dump(logged(runner), f)
    torch_dist.barrier()
    # Leave without tearing the gloo group down: its destructor joins the
    # group's worker thread while holding the GIL, which that thread may
    # need to release a Python tensor (a deadlock seen with torch 2.13).
    os._exit(0)


@pytest.mark.slow
def test_distributed_numbers_pool_all_processes(tmp_path):
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    result_file = str(tmp_path / 'numbers')

    context = mp.spawn(
        _dist_worker, args=(port, result_file), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail('the two gloo processes did not finish in 180 s')

    expected = hand_numbers(lambda x: balanced_grad(x, 0.5, 1.5, 1.0), 1.0)
    for rank in range(2):
        with open(f'{result_file}.{rank}') as f:
            assert json.load(f) == pytest.approx(expected, rel=1e-5)
