import importlib.util
import json
import os.path as osp
import subprocess
import sys

import pytest

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SCRIPT = osp.join(REPO_ROOT, 'tools', 'compare_runs.py')

spec = importlib.util.spec_from_file_location('compare_runs', SCRIPT)
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)

METRICS = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'bbox_mAP_s',
           'bbox_mAP_m', 'bbox_mAP_l')


def write_run(work_dir,
              timestamp,
              ap_offset,
              epochs=3,
              reg_grad=False,
              iters_per_epoch=10):
    """Write a scalars.json shaped like MMEngine's LoggerHook output."""
    vis = work_dir / timestamp / 'vis_data'
    vis.mkdir(parents=True)
    lines = []
    for epoch in range(1, epochs + 1):
        for i in range(5, iters_per_epoch + 1, 5):
            it = (epoch - 1) * iters_per_epoch + i
            rec = dict(
                lr=0.02,
                data_time=0.01,
                loss=3.0 / it,
                loss_cls=2.0 / it,
                loss_bbox=1.0 / it,
                acc=90.0,
                time=0.2,
                epoch=epoch,
                iter=it,
                memory=0,
                step=it)
            if reg_grad:
                rec['reg_grad/inlier_ratio'] = 0.1 * epoch
                rec['reg_grad/inlier_grad_share'] = 0.5
            lines.append(rec)
        values = [
            ap_offset + 0.1 * epoch, 0.9, 0.2 + ap_offset, 0.1, 0.3, -1.0
        ]
        val = {f'coco/{k}': v for k, v in zip(METRICS, values)}
        val.update(data_time=0.1, time=0.3, step=epoch)
        lines.append(val)
    with open(vis / 'scalars.json', 'w') as f:
        f.write('\n'.join(json.dumps(rec) for rec in lines) + '\n')
    return vis / 'scalars.json'


@pytest.fixture
def two_runs(tmp_path):
    write_run(tmp_path / 'l1', '20260101_120000', 0.0)
    # An older run in the same work dir must be ignored.
    write_run(tmp_path / 'balanced', '20251231_235959', 0.5, epochs=1)
    write_run(tmp_path / 'balanced', '20260101_130000', 0.05, reg_grad=True)
    return tmp_path / 'l1', tmp_path / 'balanced'


def test_latest_run_is_read(two_runs):
    _, balanced = two_runs
    path = compare_runs.find_scalars_file(str(balanced))
    assert path == str(balanced / '20260101_130000' / 'vis_data' /
                       'scalars.json')
    run = compare_runs.load_run(str(balanced))
    assert run.label == 'balanced'
    assert len(run.train) == 6 and len(run.val) == 3
    assert run.by_epoch
    assert run.val[-1]['coco/bbox_mAP'] == pytest.approx(0.35)


def test_missing_run_raises(tmp_path):
    (tmp_path / 'not_a_run').mkdir()
    with pytest.raises(FileNotFoundError, match='no <timestamp>/vis_data'):
        compare_runs.find_scalars_file(str(tmp_path))


def test_bad_line_raises(tmp_path):
    path = tmp_path / 'scalars.json'
    path.write_text('{"iter": 1, "loss": 1.0}\n{oops\n')
    with pytest.raises(ValueError, match=r'scalars.json:2 is not a JSON'):
        compare_runs.load_run(str(path))


def test_table(two_runs):
    l1, balanced = two_runs
    runs = [
        compare_runs.load_run(str(l1), 'L1'),
        compare_runs.load_run(str(balanced), 'Balanced L1')
    ]
    lines = compare_runs.metrics_table(runs).splitlines()
    assert lines[0] == (
        '| run | evaluated at | AP | AP50 | AP75 | APs | APm | APl | '
        'inlier_grad_share (last / mean) | inlier_ratio (last / mean) |')
    assert lines[2] == ('| L1 | epoch 3 | 0.300 | 0.900 | 0.200 | 0.100 | '
                        '0.300 | n/a | n/a | n/a |')
    # inlier_ratio is 0.1, 0.1, 0.2, 0.2, 0.3, 0.3: last 0.3, mean 0.2.
    assert lines[3] == ('| Balanced L1 | epoch 3 | 0.350 | 0.900 | 0.250 | '
                        '0.100 | 0.300 | n/a | 0.500 / 0.500 | '
                        '0.300 / 0.200 |')


def test_table_without_reg_grad_has_only_ap_columns(two_runs):
    l1, _ = two_runs
    table = compare_runs.metrics_table([compare_runs.load_run(str(l1))])
    assert table.splitlines()[0].count('|') == 9
    assert 'reg_grad' not in table and 'inlier' not in table


@pytest.mark.parametrize('value, text', [
    (0.5, '0.500'),
    (0.0, '0.000'),
    (0.01, '0.010'),
    (0.0019531, '1.95e-03'),
    (-0.004, '-4.00e-03'),
    (12.3456, '12.346'),
])
def test_format_scalar(value, text):
    assert compare_runs.format_scalar(value) == text


@pytest.mark.parametrize('arg, expected', [
    ('l1=work_dirs/l1', ('l1', 'work_dirs/l1')),
    ('work_dirs/l1', (None, 'work_dirs/l1')),
    ('a=b=c', ('a', 'b=c')),
    ('=work_dirs/x', (None, '=work_dirs/x')),
])
def test_parse_run_arg(arg, expected):
    assert compare_runs.parse_run_arg(arg) == expected


def test_cli_writes_report_and_plots(two_runs, tmp_path):
    l1, balanced = two_runs
    out_dir = tmp_path / 'out'
    result = subprocess.run([
        sys.executable, SCRIPT, f'L1={l1}',
        str(balanced), '--out-dir',
        str(out_dir)
    ],
                            check=True,
                            capture_output=True,
                            text=True)
    assert '| L1 | epoch 3 | 0.300 |' in result.stdout
    assert '| balanced | epoch 3 | 0.350 |' in result.stdout

    report = (out_dir / 'report.md').read_text()
    assert '| L1 | epoch 3 | 0.300 |' in report
    for name in ('losses.png', 'val_bbox_mAP.png', 'reg_grad.png'):
        png = out_dir / name
        assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
        assert png.stat().st_size > 10_000
        assert f']({name})' in report


def test_no_validation_yet(tmp_path):
    vis = tmp_path / 'run' / '20260101_000000' / 'vis_data'
    vis.mkdir(parents=True)
    (vis / 'scalars.json'
     ).write_text('{"loss": 1.5, "loss_cls": 1.0, "iter": 5, "step": 5}\n')
    run = compare_runs.load_run(str(tmp_path / 'run'))
    outputs = compare_runs.compare([run], str(tmp_path / 'out'))

    assert '| run | not evaluated | n/a | n/a |' in outputs['table']
    assert 'losses' in outputs and 'val_map' not in outputs
    assert not (tmp_path / 'out' / 'val_bbox_mAP.png').exists()
