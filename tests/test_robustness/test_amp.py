"""Mixed precision on the CPU: bfloat16 autocast keeps the loss finite.

MMEngine 0.10.7's ``AmpOptimWrapper`` asserts that a GPU (or NPU, MLU,
MUSA) is present, so ``tools/train.py --amp`` uses the plugin's
``CPUAmpOptimWrapper`` (bfloat16 autocast) on a CPU-only machine.
"""
import math

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from robustness_utils import read_scalars, run_tool

from balanced_l1_plugin import BalancedL1Loss


@pytest.mark.parametrize('scale', [1e-3, 1.0, 1e3, 1e30])
def test_loss_under_cpu_autocast_is_float32_and_finite(scale):
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    x = torch.randn(64, 8) * scale
    target = torch.randn(64, 4) * scale
    loss_fn = BalancedL1Loss(beta=0.11)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        pred = layer(x)
        loss = loss_fn(pred, target)
    assert pred.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    for param in layer.parameters():
        assert torch.isfinite(param.grad).all()

    # The same as float32 on the bfloat16-rounded prediction.
    expected = loss_fn(pred.detach().float(), target)
    torch.testing.assert_close(loss.detach(), expected)


@HOOKS.register_module(force=True)
class RecordDtypeHook(Hook):
    """Record the dtype of every box regression output."""

    dtypes = []

    def before_train(self, runner):
        runner.model.bbox_head.atss_reg.register_forward_hook(
            lambda module, args, output: self.dtypes.append(output.dtype))


@pytest.mark.slow
def test_training_under_cpu_bf16_autocast(tiny_config, tmp_path):
    from balanced_l1_plugin.engine.runner import build_runner
    cfg = Config.fromfile(
        tiny_config(
            max_iters=3,
            checkpoint_interval=3,
            custom_hooks=[
                dict(type='RecordDtypeHook'),
                dict(type='balanced_l1_plugin.NonFiniteCheckHook')
            ]))
    cfg.optim_wrapper.type = 'balanced_l1_plugin.CPUAmpOptimWrapper'
    cfg.work_dir = str(tmp_path / 'work')
    cfg.experiment_name = cfg.visualizer.name = tmp_path.name
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    RecordDtypeHook.dtypes.clear()
    runner = build_runner(cfg)
    runner.train()

    # One call per FPN level and iteration.
    assert RecordDtypeHook.dtypes == [torch.bfloat16] * 3 * 3
    losses = runner.message_hub.get_scalar('train/loss').data[0]
    assert len(losses) == 3
    assert all(math.isfinite(v) and v > 0 for v in losses)
    for name, param in runner.model.named_parameters():
        assert param.dtype == torch.float32, name
        assert torch.isfinite(param).all(), name


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.is_available(), reason='tests the CPU-only --amp path')
def test_amp_flag_without_gpu_trains_under_bf16(tiny_config, tmp_path):
    work_dir = str(tmp_path / 'work')
    result = run_tool([
        'tools/train.py',
        tiny_config(max_iters=2, checkpoint_interval=2), '--work-dir',
        work_dir, '--amp'
    ])

    assert result.returncode == 0, result.stdout[-3000:]
    assert 'CPUAmpOptimWrapper' in result.stdout
    losses = [r['loss'] for r in read_scalars(work_dir) if 'loss' in r]
    assert len(losses) == 2
    assert all(math.isfinite(v) for v in losses)


def test_cpu_amp_wrapper_rejects_unknown_dtype():
    from balanced_l1_plugin.engine import CPUAmpOptimWrapper
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="dtype must be.*'float64'"):
        CPUAmpOptimWrapper(dtype='float64', optimizer=optimizer)
