"""Train one detector twice, with L1 and with Balanced L1, and compare.

Needs no GPU and downloads nothing; takes about five minutes on two CPU
cores:

1. writes the synthetic dataset to ``data/synthetic/`` (reused if there),
2. trains and evaluates the small Faster R-CNN of ``configs/synthetic/``
   with ``tools/train.py``, once with the bbox head's default L1Loss and
   once with ``balanced_l1_plugin.BalancedL1Loss``, same seed; by default
   both at the same time, one thread each,
3. writes ``work_dirs/demo/report.md`` (COCO box AP table, timings) and
   plots of the training losses and of the validation mAP.

Example::

    python tools/demo.py
    python tools/demo.py --report-only   # redo the report from the runs
"""
import argparse
import json
import os
import os.path as osp
import re
import subprocess
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, osp.join(REPO_ROOT, 'tools'))

from compare_runs import compare, load_run  # noqa: E402

from balanced_l1_plugin.datasets.synthetic import \
    make_synthetic_coco  # noqa: E402

CONFIG_DIR = osp.join('configs', 'synthetic')
# (label, work dir name, config file), in the order they are trained.
RUNS = (
    ('L1Loss', 'l1', 'faster-rcnn_r18-w32_fpn_24e_synthetic.py'),
    ('BalancedL1Loss', 'balanced_l1',
     'faster-rcnn_r18-w32_fpn_balanced-l1_24e_synthetic.py'),
)
# 'Epoch(train) [3][20/25]  lr: ...': the header, then 'key: value' pairs.
_PROGRESS = re.compile(r'(Epoch\((?:train|val)\)\s*\[[^]]*\]\[[^]]*\])(.*)')
_FIELD = re.compile(r'(\S+): (\S+)')
_SHOWN_FIELDS = ('eta', 'loss', 'loss_bbox', 'coco/bbox_mAP',
                 'coco/bbox_mAP_50', 'coco/bbox_mAP_75')
# Seconds between two progress lines per run.
_REPORT_SECONDS = 15


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Train the synthetic-data Faster R-CNN with L1Loss and '
        'with BalancedL1Loss, then write a comparison report.')
    parser.add_argument(
        '--work-dir',
        default=osp.join('work_dirs', 'demo'),
        help='where the runs and the report go (default: work_dirs/demo)')
    parser.add_argument(
        '--data-root',
        default=osp.join('data', 'synthetic'),
        help='dataset folder the configs read (default: data/synthetic)')
    parser.add_argument(
        '--report-only',
        action='store_true',
        help='skip training; rebuild the report from the latest runs')
    parser.add_argument(
        '--jobs',
        type=int,
        default=2,
        help='runs trained at the same time, sharing the CPU cores '
        '(default: 2)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        default=[],
        metavar='KEY=VALUE',
        help='passed on to tools/train.py for both runs')
    return parser.parse_args(argv)


def launch(config: str, work_dir: str, cfg_options: Sequence[str],
           threads: int) -> Tuple[subprocess.Popen, str]:
    """Start ``tools/train.py`` on ``config``, its output going to a file.

    Returns:
        tuple: The process and the path of its output file.
    """
    cmd = [
        sys.executable,
        osp.join('tools', 'train.py'), config, '--work-dir', work_dir
    ]
    if cfg_options:
        cmd += ['--cfg-options', *cfg_options]
    env = dict(os.environ)
    # More threads than free cores make every PyTorch op wait for the
    # slowest thread: on a busy machine an iteration gets ten times slower.
    env.setdefault('OMP_NUM_THREADS', str(threads))
    os.makedirs(work_dir, exist_ok=True)
    out_path = work_dir + '.out'
    with open(out_path, 'w') as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc, out_path


def last_progress(out_path: str) -> Optional[str]:
    """The latest epoch line of a training log, shortened.

    Returns:
        str or None: e.g. ``Epoch(train) [3][20/25] eta: 0:03:06 loss:
        1.4413 loss_bbox: 0.2011``, or None before the first such line.
    """
    try:
        with open(out_path, errors='replace') as f:
            lines = f.readlines()[-50:]
    except OSError:
        return None
    for line in reversed(lines):
        match = _PROGRESS.search(line)
        if match:
            fields = dict(_FIELD.findall(match.group(2)))
            shown = [
                f'{key}: {fields[key]}' for key in _SHOWN_FIELDS
                if key in fields
            ]
            return ' '.join([re.sub(r'\s+', ' ', match.group(1))] + shown)
    return None


def train_all(runs: Sequence[Tuple[str, str, str]], work_dir: str,
              cfg_options: Sequence[str], jobs: int) -> Dict[str, float]:
    """Train ``(label, name, config)`` runs, ``jobs`` at a time.

    Returns:
        dict: Wall time of each run in seconds, by label.

    Raises:
        RuntimeError: a run failed; the end of its output is in the
            message.
    """
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pending = list(runs)
    running = {}
    seconds = {}
    shown = {}
    last_report = time.perf_counter()
    while pending or running:
        while pending and len(running) < jobs:
            label, name, config = pending.pop(0)
            proc, out_path = launch(
                osp.join(CONFIG_DIR, config), osp.join(work_dir, name),
                cfg_options, threads)
            running[label] = (proc, out_path, time.perf_counter())
            print(f'[{label}] training, output in {out_path}', flush=True)
        time.sleep(1)
        report = time.perf_counter() - last_report >= _REPORT_SECONDS
        if report:
            last_report = time.perf_counter()
        for label, (proc, out_path, start) in list(running.items()):
            finished = proc.poll() is not None
            progress = last_progress(out_path)
            if ((report or finished) and progress
                    and progress != shown.get(label)):
                print(f'[{label}] {progress}', flush=True)
                shown[label] = progress
            if not finished:
                continue
            del running[label]
            if proc.returncode != 0:
                for other, *_ in running.values():
                    other.terminate()
                with open(out_path, errors='replace') as f:
                    tail = ''.join(f.readlines()[-30:])
                raise RuntimeError(
                    f'training {label} failed (exit code {proc.returncode}); '
                    f'end of {out_path}:\n{tail}')
            seconds[label] = time.perf_counter() - start
            print(f'[{label}] done in {seconds[label]:.0f} s', flush=True)
    return seconds


def data_cfg_options(data_root: str) -> list:
    """``--cfg-options`` pointing the configs at ``data_root``."""
    if osp.normpath(data_root) == osp.join('data', 'synthetic'):
        return []
    root = data_root.rstrip('/') + '/'
    val_ann = root + 'annotations/instances_val.json'
    return [
        f'train_dataloader.dataset.data_root={root}',
        f'val_dataloader.dataset.data_root={root}',
        f'test_dataloader.dataset.data_root={root}',
        f'val_evaluator.ann_file={val_ann}',
        f'test_evaluator.ann_file={val_ann}',
    ]


def report_notes(num_val: int, jobs: int, data_seconds: float,
                 seconds: Dict[str, float], total: float) -> list:
    """Markdown lines that explain the table of the report."""
    notes = [
        'Both runs train the same Faster R-CNN (ResNet-18 at half width, '
        'FPN, from scratch; configs below) with the same seed, '
        'hence the same initial weights and batches; only '
        '`roi_head.bbox_head.loss_bbox` differs. AP is COCO box AP '
        f'(`CocoMetric`) on the {num_val} validation images after the last '
        'epoch. One seed and few images: differences of a few points can '
        'come from the seed alone. `loss_bbox` in the loss plot is each '
        "run's own regression loss, so the two curves are on different "
        'scales.', ''
    ]
    notes += [
        f'- `{label}`: `{osp.join(CONFIG_DIR, config)}`'
        for label, _, config in RUNS
    ]
    if seconds:
        notes += [
            '', f'Wall time, {jobs} run(s) at a time on '
            f'{os.cpu_count()} CPU core(s):', '', '| step | seconds |',
            '|---|---:|', f'| dataset | {data_seconds:.0f} |'
        ]
        notes += [
            f'| train + evaluate, {label} | {seconds[label]:.0f} |'
            for label, _, _ in RUNS if label in seconds
        ]
        notes.append(f'| total | {total:.0f} |')
    return notes


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.jobs < 1:
        raise ValueError(f'--jobs must be >= 1, got {args.jobs}')
    os.chdir(REPO_ROOT)
    start = time.perf_counter()

    paths = make_synthetic_coco(args.data_root)
    data_seconds = time.perf_counter() - start

    seconds = {}
    if not args.report_only:
        cfg_options = data_cfg_options(args.data_root) + args.cfg_options
        seconds = train_all(RUNS, args.work_dir, cfg_options, args.jobs)

    runs = [
        load_run(osp.join(args.work_dir, name), label)
        for label, name, _ in RUNS
    ]
    with open(paths['val_ann']) as f:
        num_val = len(json.load(f)['images'])
    notes = report_notes(num_val, args.jobs, data_seconds, seconds,
                         time.perf_counter() - start)
    outputs = compare(
        runs,
        args.work_dir,
        title='Balanced L1 vs L1 on synthetic data',
        notes=notes)

    print(outputs['table'])
    print(f'\nreport: {osp.join(REPO_ROOT, outputs["report"])}')
    if seconds:
        print(f'total time: {time.perf_counter() - start:.0f} s')


if __name__ == '__main__':
    main()
