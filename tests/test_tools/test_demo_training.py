import importlib.util
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
from mmengine.config import Config

from balanced_l1_plugin.datasets.synthetic import (SYNTHETIC_CLASSES,
                                                   make_synthetic_coco)

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG_DIR = osp.join(REPO_ROOT, 'configs', 'synthetic')
L1_CONFIG = osp.join(CONFIG_DIR, 'faster-rcnn_r18-w32_fpn_24e_synthetic.py')
BALANCED_CONFIG = osp.join(
    CONFIG_DIR, 'faster-rcnn_r18-w32_fpn_balanced-l1_24e_synthetic.py')
LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


def load_tool(name):
    spec = importlib.util.spec_from_file_location(
        name, osp.join(REPO_ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_scalars(work_dir):
    """Training and validation records of the only run in ``work_dir``."""
    compare_runs = load_tool('compare_runs')
    run = compare_runs.load_run(str(work_dir))
    return run.train, run.val


def test_configs_differ_only_in_loss_bbox():
    l1 = Config.fromfile(L1_CONFIG).to_dict()
    balanced = Config.fromfile(BALANCED_CONFIG).to_dict()
    l1_loss = l1['model']['roi_head']['bbox_head'].pop('loss_bbox')
    balanced_loss = balanced['model']['roi_head']['bbox_head'].pop('loss_bbox')

    assert l1_loss == dict(type='L1Loss', loss_weight=1.0)
    assert balanced_loss == dict(
        type='balanced_l1_plugin.BalancedL1Loss',
        alpha=0.5,
        gamma=1.5,
        beta=1.0,
        loss_weight=1.0)
    assert l1 == balanced
    assert l1['randomness']['seed'] == 0
    assert tuple(l1['classes']) == SYNTHETIC_CLASSES
    assert l1['train_dataloader']['dataset']['data_root'] == 'data/synthetic/'
    # The gradient diagnostics record what the logger writes.
    assert l1['custom_hooks'] == [
        dict(type='balanced_l1_plugin.RegressionGradientHook', interval=5)
    ]
    assert l1['default_hooks']['logger']['interval'] == 5


@pytest.mark.parametrize('config, loss_type', [
    (L1_CONFIG, 'L1Loss'),
    (BALANCED_CONFIG, 'BalancedL1Loss'),
])
def test_configs_build(config, loss_type):
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    import balanced_l1_plugin  # noqa: F401  (registers the loss)
    init_default_scope('mmdet')
    cfg = Config.fromfile(config)
    model = MODELS.build(cfg.model)

    loss = model.roi_head.bbox_head.loss_bbox
    assert type(loss).__name__ == loss_type
    if loss_type == 'BalancedL1Loss':
        assert type(loss).__module__.startswith('balanced_l1_plugin.')
    assert model.roi_head.bbox_head.num_classes == 4
    # Small enough to train on two CPU cores in minutes.
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def train_short(data_dir, work_dir):
    """Three tiny epochs of the L1 config through tools/train.py."""
    paths = make_synthetic_coco(
        str(data_dir), num_train=16, num_val=4, progress=False)
    root = paths['data_root'] + '/'
    cmd = [
        sys.executable,
        osp.join(REPO_ROOT, 'tools', 'train.py'), L1_CONFIG, '--work-dir',
        str(work_dir), '--cfg-options'
    ]
    cmd += [f'{loader}.dataset.data_root={root}' for loader in LOADERS]
    cmd += [
        f'val_evaluator.ann_file={paths["val_ann"]}',
        f'test_evaluator.ann_file={paths["val_ann"]}',
        'train_dataloader.batch_size=4', 'train_cfg.max_epochs=3',
        'train_cfg.val_interval=3', 'default_hooks.logger.interval=1',
        'default_hooks.checkpoint.interval=3', 'custom_hooks.0.interval=1'
    ]
    result = subprocess.run(
        cmd,
        cwd=str(work_dir.parent),
        env=dict(os.environ, OMP_NUM_THREADS='1'),
        capture_output=True,
        text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return work_dir


@pytest.fixture(scope='module')
def short_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('demo_training')
    return train_short(tmp / 'data', tmp / 'work_dir')


@pytest.mark.slow
def test_short_training_lowers_the_loss(short_run):
    train, val = read_scalars(short_run)
    losses = [rec['loss'] for rec in train]

    # 16 images in batches of 4, 3 epochs, a record per iteration.
    assert [rec['iter'] for rec in train] == list(range(1, 13))
    # The logged loss is a moving average over 5 iterations.
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3
    assert losses[-1] == min(losses)
    # Evaluated once, after the last epoch, with every COCO box metric.
    assert len(val) == 1 and val[0]['step'] == 3
    for key in ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'bbox_mAP_s',
                'bbox_mAP_m', 'bbox_mAP_l'):
        assert -1 <= val[0][f'coco/{key}'] <= 1


@pytest.mark.slow
def test_same_seed_same_run(short_run, tmp_path):
    again = train_short(tmp_path / 'data', tmp_path / 'work_dir')
    first, first_val = read_scalars(short_run)
    second, second_val = read_scalars(again)

    def drop_times(records):
        return [{
            k: v
            for k, v in rec.items() if 'time' not in k
        } for rec in records]

    assert drop_times(second) == drop_times(first)
    assert drop_times(second_val) == drop_times(first_val)


@pytest.mark.slow
def test_compare_runs_on_a_real_run(short_run, tmp_path):
    # A second run, faked from the real one with a shifted mAP.
    fake = tmp_path / 'fake' / '20000101_000000' / 'vis_data'
    fake.mkdir(parents=True)
    train, val = read_scalars(short_run)
    shifted = dict(val[0], **{'coco/bbox_mAP': 0.5})
    with open(fake / 'scalars.json', 'w') as f:
        for rec in train + [shifted]:
            f.write(json.dumps(rec) + '\n')

    out_dir = tmp_path / 'out'
    stdout = subprocess.run([
        sys.executable,
        osp.join(REPO_ROOT, 'tools', 'compare_runs.py'), f'real={short_run}',
        f'fake={tmp_path / "fake"}', '--out-dir',
        str(out_dir)
    ],
                            check=True,
                            capture_output=True,
                            text=True).stdout

    real_ap = val[0]['coco/bbox_mAP']
    share = [rec['reg_grad/inlier_grad_share'] for rec in train]
    assert len(share) == 12
    assert all(0 <= value <= 1 for value in share)
    fmt = load_tool('compare_runs').format_scalar
    cell = f'{fmt(share[-1])} / {fmt(sum(share) / len(share))}'
    lines = stdout.splitlines()
    assert 'inlier_grad_share (last / mean)' in lines[0]
    assert lines[2].startswith(f'| real | epoch 3 | {real_ap:.3f} |')
    assert cell in lines[2]
    assert lines[3].startswith('| fake | epoch 3 | 0.500 |')
    for name in ('losses.png', 'val_bbox_mAP.png', 'reg_grad.png'):
        assert (out_dir / name).stat().st_size > 10_000


def test_demo_report_only(tmp_path, monkeypatch):
    demo = load_tool('demo')
    work_dir = tmp_path / 'demo'
    for name, ap in (('l1', 0.41), ('balanced_l1', 0.43)):
        vis = work_dir / name / '20260101_000000' / 'vis_data'
        vis.mkdir(parents=True)
        records = [
            dict(loss=2.0, loss_bbox=0.5, epoch=1, iter=5, step=5),
            {
                'coco/bbox_mAP': ap,
                'coco/bbox_mAP_50': 0.8,
                'coco/bbox_mAP_75': 0.4,
                'coco/bbox_mAP_s': 0.2,
                'coco/bbox_mAP_m': 0.5,
                'coco/bbox_mAP_l': 0.6,
                'step': 1
            },
        ]
        (vis / 'scalars.json').write_text('\n'.join(
            json.dumps(rec) for rec in records))
    data_root = tmp_path / 'data'
    monkeypatch.chdir(tmp_path)

    demo.main([
        '--work-dir',
        str(work_dir), '--data-root',
        str(data_root), '--report-only'
    ])

    report = (work_dir / 'report.md').read_text()
    assert ('| L1Loss | epoch 1 | 0.410 | 0.800 | 0.400 | 0.200 | 0.500 | '
            '0.600 |') in report
    assert '| BalancedL1Loss | epoch 1 | 0.430 |' in report
    assert (work_dir / 'val_bbox_mAP.png').stat().st_size > 10_000
    assert (work_dir / 'losses.png').stat().st_size > 10_000
    assert osp.isfile(data_root / 'annotations' / 'instances_val.json')


@pytest.mark.parametrize('data_root, expected', [
    ('data/synthetic', []),
    ('data/synthetic/', []),
    ('/x/y', [
        'train_dataloader.dataset.data_root=/x/y/',
        'val_dataloader.dataset.data_root=/x/y/',
        'test_dataloader.dataset.data_root=/x/y/',
        'val_evaluator.ann_file=/x/y/annotations/instances_val.json',
        'test_evaluator.ann_file=/x/y/annotations/instances_val.json',
    ]),
])
def test_demo_data_cfg_options(data_root, expected):
    assert load_tool('demo').data_cfg_options(data_root) == expected


def test_demo_stops_on_a_failed_run(tmp_path, monkeypatch):
    demo = load_tool('demo')
    monkeypatch.chdir(REPO_ROOT)
    missing = tmp_path / 'missing'
    with pytest.raises(RuntimeError, match='training L1Loss failed') as e:
        demo.train_all(
            demo.RUNS[:1],
            str(tmp_path / 'work_dir'),
            demo.data_cfg_options(str(missing)),
            jobs=1)
    # The message ends with the run's own error.
    assert 'does not exist' in str(e.value)
    assert osp.isfile(tmp_path / 'work_dir' / 'l1.out')
