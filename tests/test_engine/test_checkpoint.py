"""Atomic checkpoint writing, resumable-checkpoint search, safe loading."""
import os
import os.path as osp
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from mmengine.logging import MessageHub

from balanced_l1_plugin.engine.checkpoint import (
    LAST_CHECKPOINT, PARTIAL_SUFFIX, find_resumable_checkpoint,
    is_complete_checkpoint, safe_checkpoint_loading, save_atomic,
    save_checkpoint_atomic, write_text_atomic)

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


class NotAllowed:
    """A class no allow-list names."""


def _checkpoint(value: float) -> dict:
    return dict(state_dict=dict(w=torch.full((3, ), value)))


def _partials(dirname: str) -> list:
    return [n for n in os.listdir(dirname) if n.endswith(PARTIAL_SUFFIX)]


def _set_mtime(path: str, seconds_ago: float) -> None:
    t = time.time() - seconds_ago
    os.utime(path, (t, t))


def test_save_checkpoint_atomic_round_trip(tmp_path):
    path = str(tmp_path / 'epoch_1.pth')
    save_checkpoint_atomic(_checkpoint(1.0), path)
    assert is_complete_checkpoint(path)
    assert torch.load(path)['state_dict']['w'].tolist() == [1.0] * 3
    assert _partials(str(tmp_path)) == []


def test_failed_write_keeps_previous_file(tmp_path):
    path = str(tmp_path / 'epoch_1.pth')
    save_checkpoint_atomic(_checkpoint(1.0), path)

    def write_half_then_fail(tmp: str) -> None:
        with open(tmp, 'wb') as f:
            f.write(b'PK\x03\x04 half a checkpoint')
        raise OSError('disk full')

    with pytest.raises(OSError, match='disk full'):
        save_atomic(write_half_then_fail, path)

    assert torch.load(path)['state_dict']['w'].tolist() == [1.0] * 3
    assert _partials(str(tmp_path)) == []


def test_killed_save_leaves_previous_checkpoint_resumable(tmp_path):
    """SIGKILL in the middle of a save: the new file never appears and the
    pointer still leads to a checkpoint that loads."""
    work_dir = str(tmp_path)
    first = osp.join(work_dir, 'epoch_1.pth')
    save_checkpoint_atomic(_checkpoint(1.0), first)
    write_text_atomic(first, osp.join(work_dir, LAST_CHECKPOINT))

    second = osp.join(work_dir, 'epoch_2.pth')
    script = textwrap.dedent(f"""
        import os, signal
        from balanced_l1_plugin.engine.checkpoint import save_atomic

        def write(tmp):
            with open(tmp, 'wb') as f:
                f.write(b'PK' + bytes(1 << 20))
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        save_atomic(write, {second!r})
    """)
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, '-c', script], env=env)
    assert proc.returncode == -signal.SIGKILL

    assert not osp.exists(second)
    assert len(_partials(work_dir)) == 1
    assert find_resumable_checkpoint(work_dir) == first
    assert torch.load(first)['state_dict']['w'].tolist() == [1.0] * 3

    # The next save of that name clears what the killed one left.
    save_checkpoint_atomic(_checkpoint(2.0), second)
    assert _partials(work_dir) == []
    assert torch.load(second)['state_dict']['w'].tolist() == [2.0] * 3


@pytest.mark.parametrize('pointer', ['truncated', 'missing', 'empty', None])
def test_find_resumable_checkpoint_skips_bad_pointer(tmp_path, pointer):
    work_dir = str(tmp_path)
    older = osp.join(work_dir, 'epoch_1.pth')
    newer = osp.join(work_dir, 'epoch_2.pth')
    save_checkpoint_atomic(_checkpoint(1.0), older)
    _set_mtime(older, 20)
    save_checkpoint_atomic(_checkpoint(2.0), newer)
    _set_mtime(newer, 10)
    with open(newer, 'rb') as f:
        data = f.read()

    broken = osp.join(work_dir, 'epoch_3.pth')
    if pointer == 'truncated':
        with open(broken, 'wb') as f:
            f.write(data[:len(data) // 2])
        text = broken
    elif pointer == 'missing':
        text = broken
    elif pointer == 'empty':
        text = ''
    if pointer is not None:
        with open(osp.join(work_dir, LAST_CHECKPOINT), 'w') as f:
            f.write(text)

    assert find_resumable_checkpoint(work_dir) == newer


def test_find_resumable_checkpoint_trusts_good_pointer(tmp_path):
    work_dir = str(tmp_path)
    older = osp.join(work_dir, 'epoch_1.pth')
    newer = osp.join(work_dir, 'epoch_2.pth')
    save_checkpoint_atomic(_checkpoint(1.0), older)
    save_checkpoint_atomic(_checkpoint(2.0), newer)
    write_text_atomic(older, osp.join(work_dir, LAST_CHECKPOINT))
    assert find_resumable_checkpoint(work_dir) == older


def test_find_resumable_checkpoint_none(tmp_path):
    assert find_resumable_checkpoint(str(tmp_path)) is None


def test_is_complete_checkpoint_rejects_truncated(tmp_path):
    path = str(tmp_path / 'a.pth')
    save_checkpoint_atomic(_checkpoint(1.0), path)
    with open(path, 'rb') as f:
        data = f.read()
    for size in (0, 2, len(data) // 2, len(data) - 1):
        cut = str(tmp_path / f'cut_{size}.pth')
        with open(cut, 'wb') as f:
            f.write(data[:size])
        assert not is_complete_checkpoint(cut), size
    assert not is_complete_checkpoint(str(tmp_path / 'absent.pth'))


def _mmengine_like_checkpoint() -> dict:
    hub = MessageHub('checkpoint_test')
    for step, value in enumerate([0.5, 0.25, np.float32(0.125)]):
        hub.update_scalar('train/loss', value)
        hub.update_scalar('train/lr', 0.02)
        hub.update_scalar('train/iter', step)
        hub.update_scalar('train/loss_bbox', torch.tensor(0.1))
    hub.update_info('last_ckpt', '/tmp/epoch_1.pth')
    hub.update_info('keep_ckpt_ids', [1])
    return dict(
        meta=dict(
            epoch=1,
            iter=4,
            seed=0,
            dataset_meta=dict(
                classes=('a', 'b'), palette=[(220, 20, 60), (0, 0, 142)])),
        state_dict=dict(w=torch.ones(2)),
        message_hub=hub.state_dict())


def test_plain_torch_load_refuses_mmengine_checkpoint(tmp_path):
    path = str(tmp_path / 'c.pth')
    torch.save(_mmengine_like_checkpoint(), path)
    with pytest.raises(pickle.UnpicklingError, match='HistoryBuffer'):
        torch.load(path)


def test_safe_loading_reads_mmengine_checkpoint(tmp_path):
    path = str(tmp_path / 'c.pth')
    checkpoint = _mmengine_like_checkpoint()
    torch.save(checkpoint, path)
    with safe_checkpoint_loading():
        loaded = torch.load(path)
    scalars = loaded['message_hub']['log_scalars']
    assert scalars['train/loss'].data[0].tolist() == [0.5, 0.25, 0.125]
    assert scalars['train/loss_bbox'].mean() == pytest.approx(0.1)
    assert loaded['meta'] == checkpoint['meta']


def test_safe_loading_refuses_other_globals(tmp_path):
    path = str(tmp_path / 'evil.pth')
    torch.save(dict(meta=dict(obj=NotAllowed())), path)
    with safe_checkpoint_loading():
        with pytest.raises(pickle.UnpicklingError, match='NotAllowed'):
            torch.load(path)


class _FetchesUpdate:
    """Pickles as ``getattr(HistoryBuffer, 'update')``."""

    def __reduce__(self):
        from mmengine.logging import HistoryBuffer
        return getattr, (HistoryBuffer, 'update')


def test_safe_loading_restricts_getattr(tmp_path):
    """The allowed ``getattr`` returns HistoryBuffer's statistics methods
    and nothing else."""
    path = str(tmp_path / 'getattr.pth')
    torch.save(dict(obj=_FetchesUpdate()), path)
    with safe_checkpoint_loading():
        with pytest.raises(
                pickle.UnpicklingError, match="refusing getattr.*'update'"):
            torch.load(path)
