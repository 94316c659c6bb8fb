# Copyright (c) balanced_l1_plugin authors. All rights reserved.
import importlib.util
import os.path as osp

import pytest
import torch

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
spec = importlib.util.spec_from_file_location(
    'benchmark_gradient_hook',
    osp.join(REPO_ROOT, 'tools', 'benchmark_gradient_hook.py'))
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)


@pytest.mark.slow
def test_benchmark_times_both_settings_and_records():
    threads = torch.get_num_threads()
    try:
        result = benchmark.main(
            ['--iters', '2', '--warmup', '1', '--image-size', '64'])
    finally:
        torch.set_num_threads(threads)

    for clock in ('wall', 'cpu'):
        assert result[f'{clock}_on'] > 0 and result[f'{clock}_off'] > 0
        assert result[f'{clock}_ratio'] == pytest.approx(
            result[f'{clock}_on'] / result[f'{clock}_off'])
    # The hook's callbacks ran on the recorded iterations and cost
    # something, but far less than the iteration around them.
    assert 0 < result['hook_fraction'] < 0.5
    assert 0 <= result['reg_grad/inlier_ratio'] <= 1
    assert 0 <= result['reg_grad/inlier_grad_share'] <= 1


@pytest.mark.parametrize('argv,match', [
    (['--iters', '0'], '--iters must be >= 1'),
    (['--warmup', '-1'], '--warmup must be >= 0'),
    (['--batch-size', '0'], '--batch-size must be >= 1'),
])
def test_benchmark_rejects_bad_arguments(argv, match, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(argv)
    assert match in capsys.readouterr().err
