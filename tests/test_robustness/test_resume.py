"""A run killed with SIGKILL and resumed ends as if never interrupted."""
import os
import os.path as osp
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from robustness_utils import (REPO_ROOT, read_scalars, run_tool, tool_env,
                              write_tiny_config)

from balanced_l1_plugin.engine.checkpoint import find_resumable_checkpoint

MAX_ITERS = 6
INTERVAL = 2

pytestmark = pytest.mark.slow


def train_cmd(config: str, work_dir: str, *extra: str) -> list:
    return [
        'tools/train.py', config, '--work-dir', work_dir, '--cfg-options',
        f'val_evaluator.outfile_prefix={work_dir}/results', *extra
    ]


def load_checkpoint(path: str) -> dict:
    # Written by the runs of this test: trusted. What --resume does, under
    # torch.load's default weights_only=True, the resumed runs test.
    return torch.load(path, map_location='cpu', weights_only=False)


def final_metrics(work_dir: str) -> dict:
    records = [r for r in read_scalars(work_dir) if 'coco/bbox_mAP' in r]
    assert records, f'no validation metrics in {work_dir}'
    return {k: v for k, v in records[-1].items() if k.startswith('coco/')}


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def trained_iters(output: str) -> list:
    return [int(i) for i in re.findall(r'Iter\(train\) \[\s*(\d+)/', output)]


def assert_same_end(work_dir: str, reference: str) -> None:
    """Same final weights, optimizer state, predictions and metrics."""
    name = f'iter_{MAX_ITERS}.pth'
    ckpt = load_checkpoint(osp.join(work_dir, name))
    ref = load_checkpoint(osp.join(reference, name))
    assert ckpt['meta']['iter'] == MAX_ITERS
    assert ckpt['state_dict'].keys() == ref['state_dict'].keys()
    for key, value in ref['state_dict'].items():
        assert torch.equal(ckpt['state_dict'][key], value), key
    momenta = [
        s['momentum_buffer'] for s in ckpt['optimizer']['state'].values()
    ]
    ref_momenta = [
        s['momentum_buffer'] for s in ref['optimizer']['state'].values()
    ]
    assert len(momenta) == len(ref_momenta) > 0
    assert all(torch.equal(a, b) for a, b in zip(momenta, ref_momenta))

    assert read_text(osp.join(work_dir, 'results.bbox.json')) == read_text(
        osp.join(reference, 'results.bbox.json'))
    metrics = final_metrics(work_dir)
    assert metrics == final_metrics(reference)
    assert 0 <= metrics['coco/bbox_mAP_50'] <= 1


@pytest.fixture(scope='module')
def reference(synthetic_root, tmp_path_factory):
    """Work dir of an uninterrupted run."""
    tmp = tmp_path_factory.mktemp('reference')
    config = write_tiny_config(
        str(tmp / 'tiny.py'),
        synthetic_root,
        outfile_prefix=str(tmp / 'unused'),
        max_iters=MAX_ITERS,
        checkpoint_interval=INTERVAL)
    work_dir = str(tmp / 'work')
    result = run_tool(train_cmd(config, work_dir))
    assert result.returncode == 0, result.stdout[-3000:]
    assert trained_iters(result.stdout) == list(range(1, MAX_ITERS + 1))
    return work_dir


def start_training(config: str, work_dir: str, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable] + train_cmd(config, work_dir),
        cwd=REPO_ROOT,
        env=tool_env(),
        stdout=log,
        stderr=subprocess.STDOUT)


def wait_for_checkpoint(proc: subprocess.Popen, work_dir: str,
                        name: str) -> None:
    """Poll until ``last_checkpoint`` names ``name``, or the run ends."""
    pointer = osp.join(work_dir, 'last_checkpoint')
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if osp.isfile(pointer) and read_text(pointer).strip().endswith(os.sep +
                                                                       name):
            return
        time.sleep(0.01)


def test_sigkill_between_checkpoints_then_resume(synthetic_root, reference,
                                                 tmp_path):
    # Iterations slowed to 0.5 s leave time to kill between checkpoints.
    config = write_tiny_config(
        str(tmp_path / 'slow.py'),
        synthetic_root,
        outfile_prefix=str(tmp_path / 'unused'),
        max_iters=MAX_ITERS,
        checkpoint_interval=INTERVAL,
        custom_hooks=[dict(type='SlowTrainingHook', seconds=0.5)],
        imports=['robustness_utils'])
    work_dir = str(tmp_path / 'work')
    log_path = str(tmp_path / 'killed.log')
    with open(log_path, 'w') as log:
        proc = start_training(config, work_dir, log)
        wait_for_checkpoint(proc, work_dir, f'iter_{INTERVAL}.pth')
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    killed_log = read_text(log_path)
    assert proc.returncode == -signal.SIGKILL, killed_log[-3000:]
    assert not osp.exists(osp.join(work_dir, f'iter_{2 * INTERVAL}.pth'))

    # Debris a crash can leave: a partial file of a save that never
    # finished, and a newer, truncated checkpoint that last_checkpoint
    # names. Neither may be picked.
    complete = osp.join(work_dir, f'iter_{INTERVAL}.pth')
    with open(complete, 'rb') as f:
        data = f.read()
    truncated = osp.join(work_dir, f'iter_{2 * INTERVAL}.pth')
    with open(truncated, 'wb') as f:
        f.write(data[:len(data) // 2])
    with open(osp.join(work_dir, f'.iter_{2 * INTERVAL}.pth.x.part'),
              'wb') as f:
        f.write(data[:100])
    with open(osp.join(work_dir, 'last_checkpoint'), 'w') as f:
        f.write(truncated)
    assert find_resumable_checkpoint(work_dir) == complete

    # The command a user types, with the config of the killed run.
    result = run_tool(train_cmd(config, work_dir, '--resume'))
    assert result.returncode == 0, result.stdout[-3000:]
    assert f'resumed epoch: 0, iter: {INTERVAL}' in result.stdout
    assert trained_iters(result.stdout) == list(
        range(INTERVAL + 1, MAX_ITERS + 1))
    assert_same_end(work_dir, reference)


def test_sigkill_during_save_then_resume(synthetic_root, reference, tmp_path):
    # max_keep_ckpts=1: the save of iteration 4 replaces iteration 2's
    # checkpoint, the only one a resume could use.
    killed_at = 2 * INTERVAL
    config = write_tiny_config(
        str(tmp_path / 'crash.py'),
        synthetic_root,
        outfile_prefix=str(tmp_path / 'unused'),
        max_iters=MAX_ITERS,
        checkpoint_interval=INTERVAL,
        max_keep_ckpts=1,
        custom_hooks=[dict(type='SigkillOnSaveHook', at_iter=killed_at)],
        imports=['robustness_utils'])
    work_dir = str(tmp_path / 'work')
    result = run_tool(train_cmd(config, work_dir))
    assert result.returncode == -signal.SIGKILL, result.stdout[-3000:]
    assert f'Saving checkpoint at {killed_at} iterations' in result.stdout
    assert not osp.exists(osp.join(work_dir, f'iter_{killed_at}.pth'))

    resumable = find_resumable_checkpoint(work_dir)
    assert resumable == osp.join(work_dir, f'iter_{INTERVAL}.pth'), (
        f'a kill while saving iteration {killed_at} left nothing to resume '
        f'from: {sorted(os.listdir(work_dir))}')

    config = write_tiny_config(
        str(tmp_path / 'tiny.py'),
        synthetic_root,
        outfile_prefix=str(tmp_path / 'unused'),
        max_iters=MAX_ITERS,
        checkpoint_interval=INTERVAL,
        max_keep_ckpts=1)
    result = run_tool(train_cmd(config, work_dir, '--resume'))
    assert result.returncode == 0, result.stdout[-3000:]
    assert trained_iters(result.stdout) == list(
        range(INTERVAL + 1, MAX_ITERS + 1))
    assert_same_end(work_dir, reference)
