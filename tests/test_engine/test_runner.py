"""PluginRunner and SafeCheckpointHook, unknown-type messages and the CPU
process-group set-up."""
import os
import os.path as osp

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.hooks import CheckpointHook, IterTimerHook
from mmengine.logging import MessageHub, MMLogger
from mmengine.runner import Runner

from balanced_l1_plugin.engine.checkpoint import (LAST_CHECKPOINT,
                                                  find_resumable_checkpoint,
                                                  save_checkpoint_atomic)
from balanced_l1_plugin.engine.runner import (PluginRunner, SafeCheckpointHook,
                                              UnknownTypeError,
                                              describe_unknown_type,
                                              explain_unknown_types,
                                              init_cpu_distributed)


@pytest.fixture(scope='module', autouse=True)
def mmdet_scope():
    register_all_modules(init_default_scope=True)


def test_scoped_unknown_loss_names_type_and_scope():
    with pytest.raises(UnknownTypeError) as info:
        with explain_unknown_types():
            MODELS.build(dict(type='balanced_l1_plugin.BalancedL2Loss'))
    message = str(info.value)
    assert "Unknown type 'balanced_l1_plugin.BalancedL2Loss'" in message
    assert "'model' registry" in message
    assert 'Scopes searched: balanced_l1_plugin.' in message
    assert 'balanced_l1_plugin.BalancedL1Loss' in message
    assert isinstance(info.value.__cause__, KeyError)


def test_unscoped_unknown_loss_lists_parent_scopes():
    with pytest.raises(
            UnknownTypeError, match='Scopes searched: mmdet, '
            'mmengine') as info:
        with explain_unknown_types():
            MODELS.build(dict(type='BalancedL1Los'))
    message = str(info.value)
    assert "Unknown type 'BalancedL1Los'" in message
    assert 'mmdet.BalancedL1Loss' in message
    assert 'balanced_l1_plugin.BalancedL1Loss' in message


def test_other_errors_pass_through():
    with pytest.raises(KeyError, match='unrelated') as info:
        with explain_unknown_types():
            raise KeyError('unrelated')
    assert not isinstance(info.value, UnknownTypeError)
    assert describe_unknown_type(ValueError('x is wrong')) is None


def test_init_cpu_distributed_rejects_unknown_launcher():
    with pytest.raises(ValueError, match="launcher must be one of .*'lsf'"):
        init_cpu_distributed('lsf')


def test_init_cpu_distributed_none_launcher_does_nothing():
    assert init_cpu_distributed('none') is False


def test_init_cpu_distributed_needs_rank(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip('with CUDA, MMEngine initialises the process group')
    monkeypatch.delenv('RANK', raising=False)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    with pytest.raises(ValueError, match=r"missing: \['RANK', 'WORLD_SIZE'\]"):
        init_cpu_distributed('pytorch')


class _SavingRunner:
    """The parts of a Runner that a checkpoint hook uses; the save of
    ``fail_at`` raises as a full disk or a kill would end it."""

    def __init__(self, work_dir: str, name: str) -> None:
        self.work_dir = work_dir
        self.logger = MMLogger.get_instance(name)
        self.message_hub = MessageHub.get_instance(name)
        self.fail_at = None

    def save_checkpoint(self, out_dir, filename, *args, **kwargs) -> None:
        if filename == self.fail_at:
            raise OSError('No space left on device')
        save_checkpoint_atomic(
            dict(name=filename), osp.join(out_dir, filename))


def _pointer(work_dir: str) -> str:
    with open(osp.join(work_dir, LAST_CHECKPOINT)) as f:
        return f.read()


@pytest.mark.parametrize('hook_cls, kept', [(SafeCheckpointHook, True),
                                            (CheckpointHook, False)])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, hook_cls, kept):
    """With max_keep_ckpts=1, MMEngine's hook deletes iteration 1's
    checkpoint before saving iteration 2; SafeCheckpointHook only after."""
    work_dir = str(tmp_path)
    runner = _SavingRunner(work_dir, f'saving_runner_{hook_cls.__name__}')
    hook = hook_cls(interval=1, by_epoch=False, max_keep_ckpts=1)
    hook.before_train(runner)
    first = osp.join(work_dir, 'iter_1.pth')

    hook._save_checkpoint_with_step(runner, 1, {})
    assert osp.isfile(first) and _pointer(work_dir) == first

    runner.fail_at = 'iter_2.pth'
    with pytest.raises(OSError, match='No space left'):
        hook._save_checkpoint_with_step(runner, 2, {})
    assert osp.isfile(first) is kept
    assert _pointer(work_dir) == first
    assert find_resumable_checkpoint(work_dir) == (first if kept else None)


def test_safe_hook_deletes_outdated_after_save(tmp_path):
    work_dir = str(tmp_path)
    runner = _SavingRunner(work_dir, 'saving_runner_rotation')
    hook = SafeCheckpointHook(interval=1, by_epoch=False, max_keep_ckpts=2)
    hook.before_train(runner)
    for step in range(1, 5):
        hook._save_checkpoint_with_step(runner, step, {})
    assert sorted(
        os.listdir(work_dir)) == ['iter_3.pth', 'iter_4.pth', LAST_CHECKPOINT]
    assert _pointer(work_dir) == osp.join(work_dir, 'iter_4.pth')
    assert runner.message_hub.get_info('keep_ckpt_ids') == [3, 4]


@pytest.mark.parametrize('hook, expected', [
    (dict(type='CheckpointHook', interval=1), SafeCheckpointHook),
    (dict(type='mmengine.CheckpointHook', interval=1), SafeCheckpointHook),
    (dict(type=CheckpointHook, interval=1), SafeCheckpointHook),
    (dict(type='IterTimerHook'), IterTimerHook),
])
def test_plugin_runner_swaps_checkpoint_hook(monkeypatch, hook, expected):
    registered = []
    monkeypatch.setattr(
        Runner,
        'register_hook',
        lambda self, hook, priority=None: registered.append(hook))
    # The hook registration alone; no Runner set-up is needed for it.
    runner = PluginRunner.__new__(PluginRunner)

    runner.register_hook(hook)

    if expected is SafeCheckpointHook:
        assert registered == [dict(hook, type=SafeCheckpointHook)]
    else:
        assert registered == [hook]
