# Copyright (c) balanced_l1_plugin authors. All rights reserved.
"""Plot Balanced L1 against smooth L1 and L1, or the recorded gradient split.

``curves`` draws Fig. 5 of Libra R-CNN, (a) gradient and (b) loss against
the regression error, for any Balanced L1 parameters::

    python tools/plot_curves.py curves --balanced 0.5,1.5,1.0 \\
        --balanced 0.3,1.5,1.0 --smooth-l1-beta 1.0 --svg

``shares`` draws what ``RegressionGradientHook`` recorded over training,
one line per work dir::

    python tools/plot_curves.py shares work_dirs/baseline work_dirs/libra
"""
import argparse
import json
import os
import os.path as osp
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use('Agg')

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# The work-dir reading is compare_runs.py's, next to this script.
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from compare_runs import find_scalar_files  # noqa: E402

SHARE_KEYS = (
    ('reg_grad/inlier_ratio', 'Inlier ratio'),
    ('reg_grad/inlier_grad_share', 'Inlier share of the gradient'),
    ('reg_grad/inlier_grad_mean', 'Mean |gradient| per inlier'),
    ('reg_grad/outlier_grad_mean', 'Mean |gradient| per outlier'),
)

# ----------------------------------------------------------------------
# Fig. 5: gradient and loss against the regression error


def parse_balanced(text: str) -> Tuple[float, float, float]:
    """Parse ``alpha,gamma,beta`` into three positive floats."""
    parts = text.split(',')
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(
            f'--balanced takes alpha,gamma,beta (three numbers > 0), got '
            f'{text!r}')
    return values


def positive_float(text: str) -> float:
    """Parse a finite number above 0 (an argparse ``type``)."""
    try:
        value = float(text)
    except ValueError:
        value = float('nan')
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f'expected a finite number > 0, got {text!r}')
    return value


def plot_loss_curves(curves: Sequence) -> Figure:
    """Draw (a) gradient and (b) loss of each curve against ``x >= 0``.

    Args:
        curves (Sequence[Curve]): From
            :func:`balanced_l1_plugin.analysis.figure_curves`.

    Returns:
        Figure: Two axes; axis 0 holds the gradients, axis 1 the losses,
        one line per curve in the given order.
    """
    fig = Figure(figsize=(11, 4.5), layout='constrained')
    ax_grad, ax_loss = fig.subplots(1, 2)
    for curve in curves:
        style = '-' if curve.label.startswith('Balanced') else '--'
        ax_grad.plot(curve.x, curve.grad, style, label=curve.label)
        ax_loss.plot(curve.x, curve.loss, style, label=curve.label)
    ax_grad.set(
        title='(a) Gradient', xlabel='regression error |x|', ylabel='dL / dx')
    ax_loss.set(title='(b) Loss', xlabel='regression error |x|', ylabel='L(x)')
    for ax in (ax_grad, ax_loss):
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize='small')
    return fig


# ----------------------------------------------------------------------
# Recorded shares


def read_shares(
        files: Sequence[str]) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Read the hook's scalars, by step, from ``scalars.json`` files.

    A later file overrides an earlier one at the same step (a resumed run).
    An entry whose values all equal the previous entry's is dropped: the
    log processor repeats the last recorded values at logging steps where
    the hook did not record.

    Args:
        files (Sequence[str]): JSON-lines files, oldest first.

    Returns:
        dict[str, tuple[np.ndarray, np.ndarray]]: For each key of
        :data:`SHARE_KEYS` found, its steps and values.
    """
    keys = [key for key, _ in SHARE_KEYS]
    by_step = {}
    for file in files:
        with open(file) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                entry = json.loads(line)
                values = {k: entry[k] for k in keys if k in entry}
                if values and 'step' in entry:
                    by_step[int(entry['step'])] = values

    series = {key: ([], []) for key in keys}
    previous = None
    for step in sorted(by_step):
        values = by_step[step]
        if values == previous:
            continue
        previous = values
        for key, value in values.items():
            series[key][0].append(step)
            series[key][1].append(value)
    return {
        key: (np.asarray(steps,
                         dtype=np.int64), np.asarray(values, dtype=np.float64))
        for key, (steps, values) in series.items() if steps
    }


def plot_shares(
        runs: Dict[str, Dict[str, Tuple[np.ndarray, np.ndarray]]]) -> Figure:
    """Draw each recorded number against the iteration, one line per run.

    Args:
        runs (dict): Label of a run to the output of :func:`read_shares`.

    Returns:
        Figure: Four axes in the order of :data:`SHARE_KEYS`.
    """
    fig = Figure(figsize=(11, 7), layout='constrained')
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, title) in zip(axes, SHARE_KEYS):
        for label, series in runs.items():
            if key in series:
                steps, values = series[key]
                ax.plot(steps, values, marker='.', label=label)
        ax.set(title=title, xlabel='iteration', ylabel=key)
        ax.grid(True, alpha=0.3)
        if key in ('reg_grad/inlier_ratio', 'reg_grad/inlier_grad_share'):
            ax.set_ylim(0, 1)
        if ax.get_lines():
            ax.legend(fontsize='small')
    return fig


# ----------------------------------------------------------------------
# Command line


def save(fig: Figure, out_dir: str, stem: str, svg: bool) -> List[str]:
    """Save ``fig`` as PNG (and SVG) in ``out_dir``; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [osp.join(out_dir, f'{stem}.png')]
    if svg:
        paths.append(osp.join(out_dir, f'{stem}.svg'))
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line of the ``curves`` and ``shares`` commands."""
    parser = argparse.ArgumentParser(
        description='Plot Balanced L1 curves (Fig. 5 of Libra R-CNN) or '
        'the gradient split recorded by RegressionGradientHook.')
    sub = parser.add_subparsers(dest='command', required=True)

    curves = sub.add_parser(
        'curves', help='gradient and loss against the regression error')
    curves.add_argument(
        '--balanced',
        type=parse_balanced,
        action='append',
        metavar='ALPHA,GAMMA,BETA',
        help='a Balanced L1 curve; repeat for more (default: 0.5,1.5,1.0)')
    curves.add_argument(
        '--smooth-l1-beta',
        type=positive_float,
        action='append',
        metavar='BETA',
        help='a smooth L1 curve; repeat for more (default: 1.0)')
    curves.add_argument(
        '--no-l1', action='store_true', help='leave out the L1 curve')
    curves.add_argument(
        '--x-max',
        type=positive_float,
        default=None,
        help='largest regression error (default: 3 x the largest beta)')
    curves.add_argument(
        '--out-dir', default='work_dirs/plots', help='output folder')
    curves.add_argument(
        '--svg', action='store_true', help='also write an SVG file')

    shares = sub.add_parser(
        'shares', help='the hook\'s numbers over training, per work dir')
    shares.add_argument(
        'work_dirs',
        nargs='+',
        metavar='WORK_DIR',
        help='work dir, <timestamp> dir or scalars.json file')
    shares.add_argument(
        '--all-runs',
        action='store_true',
        help='join every run of a work dir (resumed training), not only '
        'the latest')
    shares.add_argument(
        '--out-dir', default='work_dirs/plots', help='output folder')
    shares.add_argument(
        '--svg', action='store_true', help='also write an SVG file')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    """Run the tool; return the paths of the written files."""
    args = parse_args(argv)
    if args.command == 'curves':
        # Imported here: it loads torch and MMDetection, which ``shares``
        # does not need.
        from balanced_l1_plugin.analysis import figure_curves
        curves = figure_curves(
            balanced=args.balanced or [(0.5, 1.5, 1.0)],
            smooth_l1_betas=args.smooth_l1_beta or [1.0],
            l1=not args.no_l1,
            x_max=args.x_max)
        paths = save(
            plot_loss_curves(curves), args.out_dir, 'balanced_l1_curves',
            args.svg)
    else:
        runs = {}
        for work_dir in args.work_dirs:
            label = osp.basename(osp.normpath(work_dir))
            if label in runs:
                label = work_dir
            series = read_shares(find_scalar_files(work_dir, args.all_runs))
            if not series:
                raise SystemExit(f'{work_dir}: no reg_grad/* scalars; was '
                                 'RegressionGradientHook in custom_hooks?')
            runs[label] = series
        paths = save(
            plot_shares(runs), args.out_dir, 'reg_grad_shares', args.svg)
    return paths


if __name__ == '__main__':
    for written in main(sys.argv[1:]):
        print(written)
