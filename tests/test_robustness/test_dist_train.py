"""Two processes of one image each train like one process of two images."""
import glob
import os.path as osp
import re
import socket
from typing import Dict, List

import pytest
import torch
from robustness_utils import run_tool

MAX_ITERS = 4

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def logged_losses(log_file: str) -> Dict[int, float]:
    """``{iteration: loss}`` of the training lines of an MMEngine log."""
    with open(log_file) as f:
        text = f.read()
    return {
        int(it): float(loss)
        for it, loss in re.findall(
            r'Iter\(train\) \[\s*(\d+)/\d+\].*?\sloss: ([\d.]+)', text)
    }


def rank_logs(work_dir: str) -> List[str]:
    """Log files of a run, rank 0 first; one if not distributed."""
    logs = glob.glob(osp.join(work_dir, '*', '*.log'))
    return sorted(logs, key=lambda p: int(re.findall(r'rank(\d+)', p)[-1]))


def final_weights(work_dir: str) -> dict:
    # The files were written by the runs of this test: trusted.
    ckpt = torch.load(
        osp.join(work_dir, f'iter_{MAX_ITERS}.pth'),
        map_location='cpu',
        weights_only=False)
    return ckpt['state_dict']


def test_dist_train_matches_single_process(tiny_config, tmp_path):
    # DEBUG makes every rank write its own log, with its own losses. The
    # check hook must not get in the way of the DDP wrapper.
    options = dict(
        max_iters=MAX_ITERS,
        checkpoint_interval=MAX_ITERS,
        custom_hooks=[dict(type='balanced_l1_plugin.NonFiniteCheckHook')],
        log_level='DEBUG')
    dist_config = tiny_config('dist', batch_size=1, **options)
    single_config = tiny_config('single', batch_size=2, **options)
    dist_dir = str(tmp_path / 'dist')
    single_dir = str(tmp_path / 'single')

    result = run_tool(
        ['tools/dist_train.sh', dist_config, '2', '--work-dir', dist_dir],
        PORT=str(free_port()))
    assert result.returncode == 0, result.stdout[-5000:]
    result = run_tool(
        ['tools/train.py', single_config, '--work-dir', single_dir])
    assert result.returncode == 0, result.stdout[-5000:]

    logs = rank_logs(dist_dir)
    assert len(logs) == 2, logs
    for log in logs:
        with open(log) as f:
            assert ("NonFiniteCheckHook checks the inputs of ['bbox_head."
                    'loss_bbox') in f.read()
    rank_losses = [logged_losses(log) for log in logs]
    single_logs = glob.glob(osp.join(single_dir, '*', '*.log'))
    assert len(single_logs) == 1, single_logs
    single = logged_losses(single_logs[0])
    iters = list(range(1, MAX_ITERS + 1))
    assert sorted(single) == sorted(rank_losses[0]) == iters
    # Each rank sees one of the two images of the single process's batch,
    # and ATSS normalises by the positives of all ranks: the single
    # process's loss is the mean of the ranks' (logged to 4 decimals).
    for it in iters:
        mean = (rank_losses[0][it] + rank_losses[1][it]) / 2
        assert mean == pytest.approx(single[it], rel=1e-3, abs=2e-4), it
    # Not the same data on both ranks.
    assert rank_losses[0] != rank_losses[1]

    dist_weights = final_weights(dist_dir)
    single_weights = final_weights(single_dir)
    assert dist_weights.keys() == single_weights.keys()
    initial_gap = 0.0
    for key, value in single_weights.items():
        torch.testing.assert_close(
            dist_weights[key], value, rtol=1e-4, atol=1e-5, msg=key)
        initial_gap = max(initial_gap, float(value.abs().max()))
    assert initial_gap > 0
