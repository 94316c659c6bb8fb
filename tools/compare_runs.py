"""Compare MMEngine training runs: a COCO box AP table and loss/mAP plots.

Each run is a work dir written by ``tools/train.py``; its latest
``<timestamp>/vis_data/scalars.json`` is read. Example::

    python tools/compare_runs.py l1=work_dirs/l1 \\
        balanced=work_dirs/balanced --out-dir work_dirs/compare

writes ``report.md`` (the table), ``losses.png`` and ``val_bbox_mAP.png``
under ``--out-dir``, plus ``reg_grad.png`` when the runs logged
``reg_grad/*`` scalars, and prints the table.
"""
import argparse
import json
import math
import os
import os.path as osp
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# Column title and suffix of the metric key: ``<prefix>bbox_mAP<suffix>``.
BBOX_METRICS = (('AP', ''), ('AP50', '_50'), ('AP75', '_75'), ('APs', '_s'),
                ('APm', '_m'), ('APl', '_l'))
REG_GRAD_PREFIX = 'reg_grad/'
SCALARS_FILE = osp.join('vis_data', 'scalars.json')
# MMEngine names each run's folder after its start time.
_TIMESTAMP = re.compile(r'^\d{8}_\d{6}$')


@dataclass
class RunLog:
    """Scalars of one run, split into training and validation records.

    Training records carry ``iter`` (and ``epoch`` when trained by epoch);
    a validation record's ``step`` is the epoch or the iteration after
    which it was measured.
    """
    label: str
    path: str
    train: List[dict] = field(default_factory=list)
    val: List[dict] = field(default_factory=list)

    @property
    def by_epoch(self) -> bool:
        return any('epoch' in rec for rec in self.train)


def find_scalar_files(path: str, all_runs: bool = False) -> List[str]:
    """The ``scalars.json`` files of a work dir, oldest run first.

    Args:
        path (str): A work dir (its ``<timestamp>/vis_data/scalars.json``
            are used), one run's ``<timestamp>`` dir, or a
            ``scalars.json`` file.
        all_runs (bool): Use every run of a work dir, not only the latest.
            Defaults to False.

    Returns:
        list[str]: Paths of existing files.

    Raises:
        FileNotFoundError: ``path`` holds no ``scalars.json``.
    """
    if osp.isfile(path):
        return [path]
    direct = osp.join(path, SCALARS_FILE)
    if osp.isfile(direct):
        return [direct]
    runs = sorted(
        name for name in (os.listdir(path) if osp.isdir(path) else [])
        if _TIMESTAMP.match(name)
        and osp.isfile(osp.join(path, name, SCALARS_FILE)))
    if not runs:
        raise FileNotFoundError(
            f'no <timestamp>/{SCALARS_FILE} under {path!r}')
    if not all_runs:
        runs = runs[-1:]
    return [osp.join(path, name, SCALARS_FILE) for name in runs]


def find_scalars_file(work_dir: str) -> str:
    """Path of the ``scalars.json`` of the latest run in ``work_dir``.

    ``work_dir`` may also be one run's timestamp folder or the
    ``scalars.json`` file itself.

    Raises:
        FileNotFoundError: no run with a ``scalars.json`` is there.
    """
    return find_scalar_files(work_dir)[-1]


def load_run(work_dir: str, label: Optional[str] = None) -> RunLog:
    """Read the latest run of ``work_dir``.

    Args:
        work_dir (str): An MMEngine work dir (or see
            :func:`find_scalars_file`).
        label (str, optional): Name of the run in tables and legends.
            Defaults to the work dir's folder name.

    Returns:
        RunLog: The run's training and validation records.
    """
    path = find_scalars_file(work_dir)
    if label is None:
        label = osp.basename(osp.normpath(work_dir))
    run = RunLog(label=label, path=path)
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f'{path}:{line_no} is not a JSON record: {e}') from e
            # Only the training log adds the global ``iter`` to a record.
            (run.train if 'iter' in record else run.val).append(record)
    return run


def bbox_metric_keys(run: RunLog) -> Dict[str, str]:
    """Map each column of :data:`BBOX_METRICS` to the run's metric key."""
    keys = {}
    names = set().union(*run.val) if run.val else set()
    for title, suffix in BBOX_METRICS:
        pattern = re.compile(rf'(^|/)bbox_mAP{re.escape(suffix)}$')
        found = sorted(name for name in names if pattern.search(name))
        if found:
            keys[title] = found[0]
    return keys


def reg_grad_keys(runs: Sequence[RunLog]) -> List[str]:
    """Names of the ``reg_grad/*`` scalars logged by any of ``runs``."""
    keys = set()
    for run in runs:
        for rec in run.train:
            keys.update(k for k in rec if k.startswith(REG_GRAD_PREFIX))
    return sorted(keys)


def last_and_mean(records: Sequence[dict],
                  key: str) -> Tuple[Optional[float], Optional[float]]:
    """Last value and mean of ``key`` over the records that have it."""
    values = [
        rec[key] for rec in records
        if isinstance(rec.get(key), (int, float)) and math.isfinite(rec[key])
    ]
    if not values:
        return None, None
    return values[-1], sum(values) / len(values)


def _fmt(value: Optional[float], digits: int = 3) -> str:
    # COCO reports -1 for an area range with no ground truth.
    if value is None or value < 0:
        return 'n/a'
    return f'{value:.{digits}f}'


def format_scalar(value: float) -> str:
    """Three decimals, or three significant digits below 0.01.

    Gradient means divided by ``avg_factor`` are around 1e-3: three
    decimals would print them all as 0.002.
    """
    if value != 0 and abs(value) < 0.01:
        return f'{value:.2e}'
    return f'{value:.3f}'


def metrics_table(runs: Sequence[RunLog]) -> str:
    """Markdown table of each run's last validation metrics.

    The columns are the COCO box APs, then, for every ``reg_grad/*`` scalar
    found, its last value and its mean over training (``last / mean``).
    """
    grad_keys = reg_grad_keys(runs)
    header = ['run', 'evaluated at'] + [t for t, _ in BBOX_METRICS]
    header += [k[len(REG_GRAD_PREFIX):] + ' (last / mean)' for k in grad_keys]
    lines = [
        '| ' + ' | '.join(header) + ' |',
        '|' + '|'.join(['---'] + ['---:'] * (len(header) - 1)) + '|'
    ]
    for run in runs:
        keys = bbox_metric_keys(run)
        evaluated = [rec for rec in run.val if keys.get('AP') in rec]
        last = evaluated[-1] if evaluated else {}
        if last:
            unit = 'epoch' if run.by_epoch else 'iter'
            where = f'{unit} {last.get("step", "?")}'
        else:
            where = 'not evaluated'
        row = [run.label, where]
        row += [
            _fmt(last.get(keys[t])) if t in keys else 'n/a'
            for t, _ in BBOX_METRICS
        ]
        for key in grad_keys:
            value, mean = last_and_mean(run.train, key)
            row.append(f'{format_scalar(value)} / {format_scalar(mean)}'
                       if value is not None else 'n/a')
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def _series(records: Sequence[dict], x_key: str,
            y_key: str) -> Tuple[List[float], List[float]]:
    pairs = [(rec[x_key], rec[y_key]) for rec in records
             if x_key in rec and isinstance(rec.get(y_key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _grid_plot(runs: Sequence[RunLog], keys: Sequence[str], path: str,
               title: str) -> str:
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for run in runs:
            xs, ys = _series(run.train, 'iter', key)
            if xs:
                ax.plot(xs, ys, label=run.label, linewidth=1)
        ax.set_title(key)
        ax.set_xlabel('iteration')
        ax.grid(alpha=0.3)
        ax.legend(fontsize='small')
    for ax in list(axes.flat)[len(keys):]:
        ax.axis('off')
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_losses(runs: Sequence[RunLog], path: str) -> Optional[str]:
    """Plot every ``loss*`` scalar against the iteration, one panel each.

    Returns:
        str or None: ``path``, or None when no run logged a loss.
    """
    keys = sorted({
        k
        for run in runs
        for rec in run.train
        for k in rec if k.startswith('loss')
    })
    # The total first, then its terms.
    keys.sort(key=lambda k: (k != 'loss', k))
    if not keys:
        return None
    return _grid_plot(runs, keys, path, 'training losses')


def plot_reg_grad(runs: Sequence[RunLog], path: str) -> Optional[str]:
    """Plot the ``reg_grad/*`` scalars, or return None if there are none."""
    keys = reg_grad_keys(runs)
    if not keys:
        return None
    return _grid_plot(runs, keys, path, 'regression gradient diagnostics')


def plot_val_map(runs: Sequence[RunLog], path: str) -> Optional[str]:
    """Plot box mAP (solid), AP50 (dashed) and AP75 (dotted) over time.

    Returns:
        str or None: ``path``, or None when no run was evaluated.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = (('AP', '-'), ('AP50', '--'), ('AP75', ':'))
    plotted = False
    for i, run in enumerate(runs):
        keys = bbox_metric_keys(run)
        color = f'C{i}'
        for title, style in styles:
            if title not in keys:
                continue
            xs, ys = _series(run.val, 'step', keys[title])
            if xs:
                ax.plot(
                    xs,
                    ys,
                    style,
                    color=color,
                    marker='o',
                    markersize=3,
                    label=f'{run.label} {title}')
                plotted = True
    if not plotted:
        plt.close(fig)
        return None
    by_epoch = all(run.by_epoch for run in runs)
    ax.set_xlabel('epoch' if by_epoch else 'iteration')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel('COCO box AP (val)')
    ax.set_title('validation box AP')
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(runs: Sequence[RunLog],
            out_dir: str,
            title: str = 'Run comparison',
            notes: Sequence[str] = ()) -> dict:
    """Write ``report.md`` and the plots of ``runs`` under ``out_dir``.

    Args:
        runs (Sequence[RunLog]): The runs, in table and legend order.
        out_dir (str): Output folder, created if missing.
        title (str): Title of ``report.md``.
        notes (Sequence[str]): Markdown lines put after the table.

    Returns:
        dict: ``table`` (the markdown table) and the paths written:
        ``report`` and, when there was data for them, ``losses``,
        ``val_map`` and ``reg_grad``.
    """
    os.makedirs(out_dir, exist_ok=True)
    outputs = dict(table=metrics_table(runs))
    plots = (('losses', 'losses.png',
              plot_losses), ('val_map', 'val_bbox_mAP.png', plot_val_map),
             ('reg_grad', 'reg_grad.png', plot_reg_grad))
    for key, name, plot in plots:
        written = plot(runs, osp.join(out_dir, name))
        if written:
            outputs[key] = written

    lines = [f'# {title}', '', outputs['table'], '', *notes, '']
    lines += [f'- `{run.label}`: `{run.path}`' for run in runs]
    lines.append('')
    for key in ('losses', 'val_map', 'reg_grad'):
        if key in outputs:
            name = osp.basename(outputs[key])
            lines += [f'![{key}]({name})', '']
    outputs['report'] = osp.join(out_dir, 'report.md')
    with open(outputs['report'], 'w') as f:
        f.write('\n'.join(lines))
    return outputs


def parse_run_arg(arg: str) -> Tuple[Optional[str], str]:
    """Split ``label=path`` into its parts; a bare path has no label."""
    if '=' in arg and not osp.exists(arg):
        label, path = arg.split('=', 1)
        if label:
            return label, path
    return None, arg


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Tabulate COCO box AP and plot losses and validation '
        'mAP of MMEngine work dirs (latest run of each).')
    parser.add_argument(
        'work_dirs',
        nargs='+',
        metavar='[LABEL=]WORK_DIR',
        help='work dirs to compare, optionally named LABEL=WORK_DIR')
    parser.add_argument(
        '--out-dir',
        default='work_dirs/compare',
        help='where report.md and the plots go (default: '
        'work_dirs/compare)')
    parser.add_argument(
        '--title', default='Run comparison', help='title of report.md')
    return parser.parse_args(argv)


def main(argv=None) -> Dict[str, str]:
    args = parse_args(argv)
    runs = []
    for arg in args.work_dirs:
        label, path = parse_run_arg(arg)
        runs.append(load_run(path, label))
    outputs = compare(runs, args.out_dir, args.title)
    print(outputs['table'])
    print(f'\nreport: {outputs["report"]}')
    return outputs


if __name__ == '__main__':
    main()
