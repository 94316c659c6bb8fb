# Copyright (c) balanced_l1_plugin authors. All rights reserved.
"""Checkpoint files that survive interruptions and load with safe unpickling.

Two problems of MMEngine 0.10.7 under current PyTorch are handled here:

* ``torch.load`` defaults to ``weights_only=True``, which refuses the few
  non-tensor objects that MMEngine puts into every checkpoint (the
  ``HistoryBuffer`` of the message hub and the NumPy arrays inside it). The
  context manager :func:`safe_checkpoint_loading` allows exactly those types
  and keeps safe unpickling on for everything else.
* MMEngine writes a checkpoint in place, so a job killed while saving leaves
  a truncated file: possibly the very file ``last_checkpoint`` names, when
  an earlier run wrote one of the same name, and possibly the only one left
  when ``max_keep_ckpts`` deleted the previous checkpoint before the save.
  :func:`save_atomic` writes to a temporary file in the same directory,
  syncs it and renames it, so a checkpoint file either is complete or does
  not exist.
"""
import contextlib
import glob
import logging
import os
import os.path as osp
import pickle
import uuid
import zipfile
from typing import Callable, Iterator, List, Optional

import numpy as np
import torch
from mmengine.logging import HistoryBuffer, print_log

LAST_CHECKPOINT = 'last_checkpoint'

# Suffix of the temporary file a checkpoint is written to. A leftover of a
# killed save does not end in '.pth', so no '*.pth' search ever finds it.
PARTIAL_SUFFIX = '.part'

# The statistics every HistoryBuffer registers on construction.
_DEFAULT_STATISTICS = frozenset(('min', 'max', 'current', 'mean'))


def _history_buffer_attribute(obj: object, name: str) -> object:
    """``getattr`` restricted to the statistics methods of HistoryBuffer.

    Pickle stores the methods in ``HistoryBuffer._statistics_methods`` as
    ``getattr(HistoryBuffer, 'mean')`` and so on. This stands in for
    ``builtins.getattr`` during safe unpickling, so that a file cannot fetch
    any other attribute of any other object.
    """
    allowed = _DEFAULT_STATISTICS | set(HistoryBuffer._statistics_methods)
    if obj is not HistoryBuffer or name not in allowed:
        raise pickle.UnpicklingError(
            f'refusing getattr({obj!r}, {name!r}) while loading a '
            'checkpoint: only the statistics methods of HistoryBuffer may '
            'be looked up')
    return getattr(obj, name)


def checkpoint_safe_globals() -> List[object]:
    """The non-tensor globals found in the checkpoints MMEngine writes.

    ``message_hub`` holds :class:`HistoryBuffer` objects, whose state is
    NumPy arrays and scalars and whose class-level table of statistics
    methods is pickled as ``getattr(HistoryBuffer, name)``. Unpickling
    therefore needs the buffer class, the NumPy array and scalar
    reconstructors, ``ndarray``, ``dtype`` and its subclasses of the real
    number types, and a ``getattr``, here one that only returns those
    methods. Everything else in a checkpoint (tensors,
    dicts, lists, tuples, strings, numbers) PyTorch allows already.

    Returns:
        list: Entries for :func:`torch.serialization.safe_globals`.
    """
    # NumPy 2 pickles its reconstructors from ``numpy._core``.
    core = np._core if hasattr(np, '_core') else np.core
    multiarray = core.multiarray
    # Unpickling a dtype builds an instance of its class (Float64DType...),
    # which must be allowed too: those of the booleans and real numbers.
    dtype_classes = [type(np.dtype(code)) for code in '?bhilqBHILQefd']
    return [
        HistoryBuffer,
        (_history_buffer_attribute, 'builtins.getattr'),
        multiarray._reconstruct,
        multiarray.scalar,
        np.ndarray,
        np.dtype,
        *dtype_classes,
    ]


@contextlib.contextmanager
def safe_checkpoint_loading() -> Iterator[None]:
    """Let ``torch.load(weights_only=True)`` read MMEngine's checkpoints.

    Inside the context, :func:`checkpoint_safe_globals` are added to the
    types that safe unpickling accepts; any other global in a file still
    raises ``pickle.UnpicklingError``.
    """
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        yield


def _fsync_dir(dirname: str) -> None:
    """Make a rename in ``dirname`` durable (a no-op where unsupported)."""
    try:
        fd = os.open(dirname, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _partial_pattern(filename: str) -> str:
    dirname, basename = osp.split(osp.abspath(filename))
    return osp.join(
        glob.escape(dirname), f'.{glob.escape(basename)}.*{PARTIAL_SUFFIX}')


def _remove_partial_files(filename: str) -> None:
    """Delete what an interrupted earlier save of ``filename`` left."""
    for path in glob.glob(_partial_pattern(filename)):
        with contextlib.suppress(OSError):
            os.remove(path)


def save_atomic(write: Callable[[str], None], filename: str) -> None:
    """Produce ``filename`` through a temporary file and an atomic rename.

    ``write`` is called with the path of a temporary file next to
    ``filename`` (same directory, hence same file system, so that
    :func:`os.replace` is atomic). The file is synced to disk before the
    rename and the directory after it. If ``write`` raises, or the process
    dies, ``filename`` keeps its previous content or stays absent.

    Args:
        write (Callable[[str], None]): Writes the complete file to the path
            it is given.
        filename (str): The final path.
    """
    dirname = osp.dirname(osp.abspath(filename))
    os.makedirs(dirname, exist_ok=True)
    _remove_partial_files(filename)
    # Unique per process and call; created by ``write`` itself, so the
    # file gets the permissions any other file of the run gets.
    tmp_path = osp.join(
        dirname, f'.{osp.basename(filename)}.{os.getpid()}.'
        f'{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}')
    try:
        write(tmp_path)
        with open(tmp_path, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, filename)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise
    _fsync_dir(dirname)


def save_checkpoint_atomic(checkpoint: dict, filename: str) -> None:
    """``torch.save`` ``checkpoint`` to ``filename`` atomically.

    Args:
        checkpoint (dict): The checkpoint.
        filename (str): Local path of the checkpoint file.
    """
    save_atomic(lambda path: torch.save(checkpoint, path), filename)


def write_text_atomic(text: str, filename: str) -> None:
    """Replace the text file ``filename`` atomically."""

    def write(path: str) -> None:
        with open(path, 'w') as f:
            f.write(text)

    save_atomic(write, filename)


def is_complete_checkpoint(filename: str) -> bool:
    """Whether ``filename`` is a whole file written by ``torch.save``.

    ``torch.save`` writes a zip archive whose central directory comes last,
    so a truncated file fails :func:`zipfile.is_zipfile`. Files in the
    legacy (non-zip) format are accepted if they are not empty.
    """
    if not osp.isfile(filename):
        return False
    if zipfile.is_zipfile(filename):
        return True
    with open(filename, 'rb') as f:
        head = f.read(4)
    # A zip archive starts with 'PK'; a file that does, yet has no readable
    # central directory, was cut short.
    return len(head) > 0 and not head.startswith(b'PK')


def find_resumable_checkpoint(work_dir: str) -> Optional[str]:
    """The newest complete checkpoint of ``work_dir``, or None.

    ``work_dir/last_checkpoint`` is trusted when it names a complete file.
    Otherwise (the pointer is missing, empty, or names a file that was
    deleted or cut short) the ``*.pth`` files of ``work_dir`` are tried,
    newest first.

    Args:
        work_dir (str): The directory a training run writes to.

    Returns:
        str or None: Path of the checkpoint to resume from.
    """
    pointer = osp.join(work_dir, LAST_CHECKPOINT)
    named = None
    if osp.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip() or None
    if named is not None and is_complete_checkpoint(named):
        return named

    candidates = sorted(
        glob.glob(osp.join(work_dir, '*.pth')), key=osp.getmtime, reverse=True)
    for candidate in candidates:
        if is_complete_checkpoint(candidate):
            if named is not None:
                print_log(
                    f'{pointer} names {named!r}, which is missing or '
                    f'incomplete; resuming from {candidate!r} instead',
                    logger='current',
                    level=logging.WARNING)
            return candidate
    return None
