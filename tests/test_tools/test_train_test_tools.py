"""tools/train.py, tools/test.py and tools/dist_train.sh, run as a user
runs them, on a tiny synthetic COCO-format dataset."""
import importlib.util
import json
import os
import os.path as osp
import pickle
import re
import socket
import subprocess
import sys

import pytest
import torch

from balanced_l1_plugin.datasets.synthetic import (SYNTHETIC_CLASSES,
                                                   make_synthetic_coco)

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TINY_CONFIG = osp.join(REPO, 'tests', 'data', 'configs',
                       'tiny_faster-rcnn_balanced-l1.py')
NUM_TRAIN, NUM_VAL = 8, 4


def run(args, timeout=300, **env):
    """Run a tool as a subprocess from the repository root."""
    full_env = dict(
        os.environ,
        PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
        OMP_NUM_THREADS='1',
        **env)
    return subprocess.run(
        args,
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout)


def tool(name, *args):
    return [sys.executable, osp.join(REPO, 'tools', name), *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def config(tmp_path_factory):
    """The tiny config pointed at a fresh synthetic dataset."""
    root = tmp_path_factory.mktemp('tools')
    data_root = str(root / 'data') + '/'
    make_synthetic_coco(
        data_root,
        num_train=NUM_TRAIN,
        num_val=NUM_VAL,
        image_size=64,
        progress=False)
    path = root / 'tiny_synthetic.py'
    path.write_text(f"""_base_ = {TINY_CONFIG!r}
data_root = {data_root!r}
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
""")
    return str(path)


@pytest.fixture(scope='module')
def trained(config, tmp_path_factory):
    """A work dir after one epoch of tools/train.py."""
    work_dir = str(tmp_path_factory.mktemp('train'))
    proc = run(tool('train.py', config, '--work-dir', work_dir))
    assert proc.returncode == 0, proc.stdout[-4000:]
    return work_dir, proc.stdout


def test_tiny_config_classes_match_dataset():
    from mmengine.config import Config
    cfg = Config.fromfile(TINY_CONFIG)
    assert cfg.classes == SYNTHETIC_CLASSES


@pytest.mark.slow
def test_train_writes_loadable_checkpoint(trained):
    work_dir, log = trained
    checkpoint = osp.join(work_dir, 'epoch_1.pth')
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        assert f.read().strip() == checkpoint
    # Four iterations of two images each, with the plugin's loss.
    assert 'Epoch(train) [1][4/4]' in log
    assert re.search(r'loss_bbox: \d+\.\d+', log)
    assert [n for n in os.listdir(work_dir) if n.endswith('.part')] == []
    # The default CheckpointHook of the config was replaced.
    assert 'SafeCheckpointHook' in log

    # Plain torch.load (weights_only=True) refuses it; the tools do not.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(checkpoint)


@pytest.mark.slow
def test_test_prints_coco_metrics_and_dumps_results(config, trained, tmp_path):
    work_dir, _ = trained
    out = str(tmp_path / 'results.pkl')
    proc = run(
        tool('test.py', config, osp.join(work_dir, 'epoch_1.pth'),
             '--work-dir', str(tmp_path / 'test'), '--out', out))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert 'Load checkpoint from' in proc.stdout
    match = re.search(r'coco/bbox_mAP: (-?\d+\.\d+)', proc.stdout)
    assert match, proc.stdout[-4000:]
    assert 0.0 <= float(match.group(1)) <= 1.0
    for key in ('bbox_mAP_50', 'bbox_mAP_75', 'bbox_mAP_s'):
        assert f'coco/{key}:' in proc.stdout

    with open(out, 'rb') as f:
        results = pickle.load(f)
    assert len(results) == NUM_VAL
    assert {'img_id', 'pred_instances'} <= set(results[0])


def load_tool(name: str):
    """Import a script of tools/ as a module."""
    spec = importlib.util.spec_from_file_location(
        f'tools_{name}', osp.join(REPO, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_test_rejects_out_without_pickle_suffix(monkeypatch, capsys):
    test_tool = load_tool('test')
    monkeypatch.setattr(sys, 'argv',
                        ['test.py', 'cfg.py', 'ckpt.pth', '--out', 'res.json'])
    with pytest.raises(SystemExit) as info:
        test_tool.parse_args()
    assert info.value.code == 2
    assert "--out must end with .pkl or .pickle, got 'res.json'" in (
        capsys.readouterr().err)


@pytest.mark.parametrize('argv, resume, load_from', [
    ([], False, None),
    (['--resume'], True, None),
    (['--resume', 'w/epoch_3.pth'], True, 'w/epoch_3.pth'),
])
def test_train_resume_flag(monkeypatch, argv, resume, load_from):
    train_tool = load_tool('train')
    monkeypatch.setattr(sys, 'argv', ['train.py', TINY_CONFIG, *argv])
    cfg = train_tool.build_cfg(train_tool.parse_args())
    assert cfg.resume is resume
    assert cfg.load_from == load_from
    assert cfg.work_dir == osp.join('./work_dirs',
                                    'tiny_faster-rcnn_balanced-l1')


def test_train_amp_and_auto_scale_lr_flags(monkeypatch):
    train_tool = load_tool('train')
    monkeypatch.setattr(sys, 'argv', [
        'train.py', TINY_CONFIG, '--amp', '--auto-scale-lr', '--work-dir', 'w',
        '--cfg-options', 'model.roi_head.bbox_head.loss_bbox.alpha=0.3'
    ])
    cfg = train_tool.build_cfg(train_tool.parse_args())
    if torch.cuda.is_available():
        assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
        assert cfg.optim_wrapper.loss_scale == 'dynamic'
    else:
        assert cfg.optim_wrapper.type == (
            'balanced_l1_plugin.CPUAmpOptimWrapper')
    assert cfg.auto_scale_lr.enable is True
    assert cfg.work_dir == 'w'
    assert cfg.model.roi_head.bbox_head.loss_bbox.alpha == 0.3


@pytest.mark.parametrize('argv, in_config, hooks', [
    ([], False, 1),
    (['--no-finite-check'], False, 0),
    ([], True, 1),
])
def test_train_adds_the_finite_check_once(monkeypatch, tmp_path, argv,
                                          in_config, hooks):
    config = TINY_CONFIG
    if in_config:
        config = str(tmp_path / 'with_hook.py')
        with open(config, 'w') as f:
            f.write(f"_base_ = [{TINY_CONFIG!r}]\n"
                    "custom_hooks = [dict(type='balanced_l1_plugin."
                    "NonFiniteCheckHook')]\n")
    train_tool = load_tool('train')
    monkeypatch.setattr(sys, 'argv', ['train.py', config, *argv])
    cfg = train_tool.build_cfg(train_tool.parse_args())
    types = [hook['type'] for hook in cfg.get('custom_hooks', None) or []]
    assert types.count('balanced_l1_plugin.NonFiniteCheckHook') == hooks


@pytest.mark.slow
@pytest.mark.parametrize('explicit', [False, True], ids=['auto', 'path'])
def test_resume(config, trained, tmp_path, explicit):
    """--resume continues the one-epoch run to epoch 2 under torch.load's
    safe default, from the newest checkpoint or from a given path."""
    work_dir, _ = trained
    resumed_dir = str(tmp_path / 'resumed')
    os.makedirs(resumed_dir)
    first = osp.join(resumed_dir, 'epoch_1.pth')
    with open(osp.join(work_dir, 'epoch_1.pth'), 'rb') as src:
        with open(first, 'wb') as dst:
            dst.write(src.read())
    with open(osp.join(resumed_dir, 'last_checkpoint'), 'w') as f:
        f.write(first)

    resume = ['--resume', first] if explicit else ['--resume']
    proc = run(
        tool('train.py', config, '--work-dir', resumed_dir, *resume,
             '--cfg-options', 'train_cfg.max_epochs=2'))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert 'resumed epoch: 1, iter: 4' in proc.stdout
    assert 'Epoch(train) [2][4/4]' in proc.stdout
    assert 'Epoch(train) [1]' not in proc.stdout
    with open(osp.join(resumed_dir, 'last_checkpoint')) as f:
        assert f.read().strip() == osp.join(resumed_dir, 'epoch_2.pth')


@pytest.mark.slow
def test_unknown_loss_fails_before_training(config, tmp_path):
    work_dir = str(tmp_path / 'unknown')
    proc = run(
        tool(
            'train.py', config, '--work-dir', work_dir, '--cfg-options',
            'model.roi_head.bbox_head.loss_bbox.type='
            'balanced_l1_plugin.BalancedL2Loss'))
    assert proc.returncode != 0
    assert ("UnknownTypeError: Unknown type "
            "'balanced_l1_plugin.BalancedL2Loss'") in proc.stdout
    assert 'Scopes searched: balanced_l1_plugin.' in proc.stdout
    assert 'balanced_l1_plugin.BalancedL1Loss' in proc.stdout
    assert 'Epoch(train)' not in proc.stdout
    assert not any(n.endswith('.pth') for n in os.listdir(work_dir))


@pytest.mark.slow
def test_dist_train_two_cpu_processes(config, tmp_path):
    """tools/dist_train.sh with 2 processes on a CPU-only PyTorch (gloo):
    each rank gets half of the images, so an epoch has 2 iterations."""
    work_dir = str(tmp_path / 'dist')
    proc = run([
        'bash',
        osp.join(REPO, 'tools', 'dist_train.sh'), config, '2', '--work-dir',
        work_dir
    ],
               PYTHON=sys.executable,
               PORT=str(free_port()))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert 'Distributed launcher: pytorch' in proc.stdout
    assert 'Distributed training: True' in proc.stdout
    assert 'Epoch(train) [1][2/2]' in proc.stdout
    assert 'Epoch(train) [1][3/' not in proc.stdout
    assert osp.isfile(osp.join(work_dir, 'epoch_1.pth'))


@pytest.mark.slow
def test_dist_test_two_cpu_processes(config, trained, tmp_path):
    """tools/dist_test.sh with 2 CPU processes gathers the predictions of
    both ranks: every validation image once, then COCO metrics."""
    work_dir, _ = trained
    out = str(tmp_path / 'results.pkl')
    proc = run([
        'bash',
        osp.join(REPO, 'tools', 'dist_test.sh'), config,
        osp.join(work_dir, 'epoch_1.pth'), '2', '--work-dir',
        str(tmp_path / 'dist_test'), '--out', out
    ],
               PYTHON=sys.executable,
               PORT=str(free_port()))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert 'Distributed launcher: pytorch' in proc.stdout
    assert re.search(r'coco/bbox_mAP: \d+\.\d+', proc.stdout)
    with open(out, 'rb') as f:
        results = pickle.load(f)
    ann_file = osp.join(
        osp.dirname(config), 'data', 'annotations', 'instances_val.json')
    with open(ann_file) as f:
        image_ids = sorted(image['id'] for image in json.load(f)['images'])
    assert len(image_ids) == NUM_VAL
    assert sorted(r['img_id'] for r in results) == image_ids
