"""Time and peak memory of Balanced L1 implementations, side by side.

Measures forward plus backward of the plugin's ``BalancedL1Loss``,
MMDetection's ``BalancedL1Loss`` and PyTorch's ``F.smooth_l1_loss`` (all
with ``reduction='mean'``, float32) on the same inputs, interleaving the
candidates round by round so that a noisy machine slows them alike, and
prints a markdown table with the ratios.

Example::

    python tools/benchmark_loss.py                  # CPU, and CUDA if present
    python tools/benchmark_loss.py --boxes 1048576 --rounds 30
"""
import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from mmdet.models.losses import BalancedL1Loss as MMDetBalancedL1Loss
from torch.profiler import ProfilerActivity, profile

from balanced_l1_plugin import BalancedL1Loss

CANDIDATES = ('plugin', 'mmdet', 'smooth_l1')


def make_losses() -> Dict[str, Callable]:
    plugin = BalancedL1Loss(alpha=0.5, gamma=1.5, beta=1.0)
    mmdet = MMDetBalancedL1Loss(alpha=0.5, gamma=1.5, beta=1.0)
    return dict(
        plugin=plugin,
        mmdet=mmdet,
        smooth_l1=lambda p, t: F.smooth_l1_loss(p, t, beta=1.0))


def step(loss_fn: Callable, pred: torch.Tensor, target: torch.Tensor) -> None:
    pred.grad = None
    loss_fn(pred, target).backward()


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_candidates(losses: Dict[str, Callable], pred: torch.Tensor,
                    target: torch.Tensor, rounds: int) -> Dict[str, float]:
    """Median milliseconds of one forward plus backward, per candidate."""
    device = pred.device
    # Enough calls per sample that small inputs are not all timer noise.
    calls = max(1, 2**20 // pred.numel())
    samples: Dict[str, List[float]] = {name: [] for name in losses}
    for name, fn in losses.items():
        step(fn, pred, target)
    for _ in range(rounds):
        for name, fn in losses.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                step(fn, pred, target)
            sync(device)
            samples[name].append(
                (time.perf_counter() - start) * 1e3 / calls)
    return {name: statistics.median(s) for name, s in samples.items()}


def cpu_peak_bytes(fn: Callable, pred: torch.Tensor,
                   target: torch.Tensor) -> int:
    """Peak bytes allocated during one step, above what existed before."""
    step(fn, pred, target)
    pred.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        step(fn, pred, target)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'trace.json')
        p.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)['traceEvents']
    memory = sorted((e for e in events if e.get('name') == '[memory]'),
                    key=lambda e: e['ts'])
    live = peak = 0
    for event in memory:
        live += event['args']['Bytes']
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(fn: Callable, pred: torch.Tensor,
                    target: torch.Tensor) -> int:
    step(fn, pred, target)
    pred.grad = None
    torch.cuda.synchronize(pred.device)
    base = torch.cuda.memory_allocated(pred.device)
    torch.cuda.reset_peak_memory_stats(pred.device)
    step(fn, pred, target)
    torch.cuda.synchronize(pred.device)
    return torch.cuda.max_memory_allocated(pred.device) - base


def benchmark(device: torch.device, boxes: List[int],
              rounds: int) -> List[dict]:
    losses = make_losses()
    rows = []
    for n in boxes:
        generator = torch.Generator().manual_seed(n)
        pred = (torch.randn(n, 4, generator=generator) * 1.5).to(device)
        target = torch.randn(n, 4, generator=generator).to(device)
        pred.requires_grad_(True)
        ms = time_candidates(losses, pred, target, rounds)
        peak_fn = cuda_peak_bytes if device.type == 'cuda' else cpu_peak_bytes
        mem = {name: peak_fn(fn, pred, target) for name, fn in losses.items()}
        rows.append(dict(device=device.type, boxes=n, ms=ms, mem=mem))
    return rows


def format_table(rows: List[dict]) -> str:
    header = ('| device | boxes (x4) | plugin ms | mmdet ms | smooth_l1 ms '
              '| plugin / mmdet time | plugin / smooth_l1 time '
              '| plugin MiB | mmdet MiB | smooth_l1 MiB '
              '| plugin / mmdet memory |')
    lines = [header, '|' + ' --- |' * 11]
    for r in rows:
        ms, mem = r['ms'], r['mem']
        mib = {k: v / 2**20 for k, v in mem.items()}
        lines.append(
            f"| {r['device']} | {r['boxes']:,} | {ms['plugin']:.3f} "
            f"| {ms['mmdet']:.3f} | {ms['smooth_l1']:.3f} "
            f"| {ms['plugin'] / ms['mmdet']:.2f}x "
            f"| {ms['plugin'] / ms['smooth_l1']:.2f}x "
            f"| {mib['plugin']:.1f} | {mib['mmdet']:.1f} "
            f"| {mib['smooth_l1']:.1f} "
            f"| {mem['plugin'] / max(mem['mmdet'], 1):.2f}x |")
    return '\n'.join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--boxes',
        type=int,
        nargs='+',
        default=[512, 65536, 1048576],
        help='numbers of boxes (each with 4 regression targets)')
    parser.add_argument(
        '--rounds', type=int, default=20, help='timed rounds per size')
    parser.add_argument(
        '--devices',
        nargs='+',
        default=None,
        help='devices to run on; default: cpu, and cuda when available')
    parser.add_argument(
        '--threads',
        type=int,
        default=None,
        help='torch.set_num_threads for the CPU runs')
    parser.add_argument('--out', help='also write the table to this file')
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f'--rounds must be >= 1, got {args.rounds}')
    if any(n < 1 for n in args.boxes):
        parser.error(f'--boxes must all be >= 1, got {args.boxes}')
    return args


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = args.devices or (['cpu', 'cuda']
                               if torch.cuda.is_available() else ['cpu'])
    rows = []
    for device in devices:
        rows += benchmark(torch.device(device), args.boxes, args.rounds)
    table = format_table(rows)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(table + '\n')
    # The table is this tool's report.
    print(f'torch {torch.__version__}, {torch.get_num_threads()} CPU '
          f'threads, median of {args.rounds} rounds, forward + backward, '
          "float32, reduction='mean'")
    print(table)


if __name__ == '__main__':
    main()
