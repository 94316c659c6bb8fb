# Copyright (c) balanced_l1_plugin authors. All rights reserved.
"""Cost of RegressionGradientHook per training iteration.

Trains a narrow Faster R-CNN on random images and times each iteration
with the hook recording (``interval=1``) and without the hook, alternating
in the order on, off, off, on, ... in one process so that both see the
same machine load, the same data and the same state of the model. Reports
the median wall and CPU time of an iteration in each setting, their ratio,
and the CPU time spent in the hook's own callbacks::

    python tools/benchmark_gradient_hook.py --iters 40
"""
import argparse
import random
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.dataset import pseudo_collate
from mmengine.logging import MessageHub
from mmengine.optim import OptimWrapper

import balanced_l1_plugin  # noqa: F401  (registers the plugin's modules)
from balanced_l1_plugin.analysis.tiny_detector import (RandomDetectionDataset,
                                                       tiny_faster_rcnn)
from balanced_l1_plugin.engine.hooks import RegressionGradientHook


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Time training iterations with and without '
        'RegressionGradientHook.')
    parser.add_argument(
        '--iters',
        type=int,
        default=40,
        help='timed iterations per setting (default: 40)')
    parser.add_argument(
        '--warmup',
        type=int,
        default=4,
        help='untimed iterations first (default: 4)')
    parser.add_argument(
        '--batch-size', type=int, default=2, help='images per iteration')
    parser.add_argument(
        '--image-size', type=int, default=128, help='image side in pixels')
    parser.add_argument(
        '--width',
        type=int,
        default=8,
        help='channels of the first ResNet stage (default: 8)')
    parser.add_argument(
        '--threads',
        type=int,
        default=1,
        help='torch threads; 0 keeps the default (default: 1)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    for name in ('iters', 'batch_size', 'width'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1')
    if args.warmup < 0:
        parser.error('--warmup must be >= 0')
    return args


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _timed(func: Callable, spent: List[float]) -> Callable:
    """``func`` that adds its CPU time to ``spent[0]``."""

    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return func(*args, **kwargs)
        finally:
            spent[0] += time.process_time() - start

    return timed


def _time_iter(hook: Optional[RegressionGradientHook], runner, batch: dict,
               optim_wrapper: OptimWrapper, batch_idx: int) -> tuple:
    """Wall and CPU seconds of one training iteration, hooked or not."""
    wall, cpu = time.perf_counter(), time.process_time()
    if hook is not None:
        hook.before_train_iter(runner, batch_idx=batch_idx)
    runner.model.train_step(batch, optim_wrapper)
    if hook is not None:
        hook.after_train_iter(runner, batch_idx=batch_idx)
    return time.perf_counter() - wall, time.process_time() - cpu


def run(iters: int = 40,
        warmup: int = 4,
        batch_size: int = 2,
        image_size: int = 128,
        width: int = 8,
        threads: int = 1,
        seed: int = 0) -> Dict[str, float]:
    """Time ``iters`` iterations with the hook and ``iters`` without.

    Wall time suffers from whatever else the machine runs, so the CPU time
    of the process is measured too, and with ``threads=1`` it counts the
    work of the iteration alone. The hook's own callbacks (the wrapping,
    the gradient statistics, the logging) are also timed directly.

    Args:
        iters (int): Timed iterations per setting. Defaults to 40.
        warmup (int): Untimed iterations before. Defaults to 4.
        batch_size (int): Images per iteration. Defaults to 2.
        image_size (int): Image side in pixels. Defaults to 128.
        width (int): Channels of the first ResNet stage. Defaults to 8.
        threads (int): ``torch.set_num_threads``; 0 keeps PyTorch's
            choice. Defaults to 1.
        seed (int): Seed of data, model and samplers. Defaults to 0.

    Returns:
        dict: Median seconds per iteration (``wall_on``, ``wall_off``,
        ``cpu_on``, ``cpu_off``), their ratios (``wall_ratio``,
        ``cpu_ratio``), the median extra time of a hooked iteration over
        the unhooked one of its pair as a fraction of an unhooked iteration
        (``wall_paired``, ``cpu_paired``), the hook's own CPU seconds per
        recorded iteration
        (``hook_cpu``) and its share of ``cpu_off`` (``hook_fraction``), and
        the hook's last ``reg_grad/*`` values.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    register_all_modules(init_default_scope=True)
    _seed(seed)
    model = MODELS.build(tiny_faster_rcnn(width=width))
    model.train()
    optim_wrapper = OptimWrapper(
        torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9))
    dataset = RandomDetectionDataset(
        num_images=4 * batch_size, image_size=image_size, seed=seed)
    batches = [
        pseudo_collate([dataset[j] for j in range(i, i + batch_size)])
        for i in range(0, len(dataset), batch_size)
    ]

    hub = MessageHub.get_instance('benchmark_gradient_hook')
    runner = SimpleNamespace(model=model, message_hub=hub, hooks=[])
    hook = RegressionGradientHook(interval=1)
    hook.before_train(runner)
    hook_spent = [0.0]
    for name in ('before_train_iter', 'after_train_iter', '_record'):
        setattr(hook, name, _timed(getattr(hook, name), hook_spent))

    times = {
        (clock, hooked): []
        for clock in ('wall', 'cpu')
        for hooked in (True, False)
    }
    warmup_pairs = (warmup + 1) // 2
    for pair in range(warmup_pairs + iters):
        if pair == warmup_pairs:
            hook_spent[0] = 0.0
        # Each setting runs first in every other pair, and both iterations
        # of a pair see the same batch and draw the same samples.
        for hooked in ((True, False) if pair % 2 == 0 else (False, True)):
            _seed(seed + pair)
            batch = batches[pair % len(batches)]
            wall, cpu = _time_iter(hook if hooked else None, runner, batch,
                                   optim_wrapper, 2 * pair + hooked)
            if pair >= warmup_pairs:
                times['wall', hooked].append(wall)
                times['cpu', hooked].append(cpu)
    hook.after_train(runner)

    result = {}
    for clock in ('wall', 'cpu'):
        on, off = times[clock, True], times[clock, False]
        result.update({
            f'{clock}_on':
            statistics.median(on),
            f'{clock}_off':
            statistics.median(off),
            f'{clock}_ratio':
            statistics.median(on) / statistics.median(off),
            # The pairs share data and machine state, so the median of the
            # differences is less noisy than the difference of the medians.
            f'{clock}_paired':
            statistics.median(a - b for a, b in zip(on, off)) /
            statistics.median(off),
        })
    result['hook_cpu'] = hook_spent[0] / len(times['cpu', True])
    result['hook_fraction'] = result['hook_cpu'] / result['cpu_off']
    for key in ('reg_grad/inlier_ratio', 'reg_grad/inlier_grad_share'):
        result[key] = hub.get_scalar(f'train/{key}').current()
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    return run(args.iters, args.warmup, args.batch_size, args.image_size,
               args.width, args.threads, args.seed)


if __name__ == '__main__':
    res = main(sys.argv[1:])
    for clock, name in (('wall', 'wall time'), ('cpu', 'CPU time')):
        print(f'{name}: median iteration {res[f"{clock}_on"] * 1e3:.1f} ms '
              f'with the hook recording every iteration, '
              f'{res[f"{clock}_off"] * 1e3:.1f} ms without; '
              f'ratio {res[f"{clock}_ratio"]:.4f}; paired difference '
              f'{100 * res[f"{clock}_paired"]:+.2f}%')
    print(f'hook callbacks: {res["hook_cpu"] * 1e3:.2f} ms CPU per recorded '
          f'iteration = {100 * res["hook_fraction"]:.2f}% of an iteration')
    print(f'last recorded: inlier_ratio={res["reg_grad/inlier_ratio"]:.3f}, '
          f'inlier_grad_share={res["reg_grad/inlier_grad_share"]:.3f}')
