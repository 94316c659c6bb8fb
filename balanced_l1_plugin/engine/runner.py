# Copyright (c) balanced_l1_plugin authors. All rights reserved.
"""The Runner of the plugin's tools and what the tools set up before it.

:class:`PluginRunner` is MMEngine's ``Runner`` with three changes:

* checkpoints are written atomically, outdated ones are deleted only after
  the new one is complete, and ``--resume`` without a path picks the newest
  *complete* checkpoint (:mod:`.checkpoint`);
* checkpoints are read with PyTorch's safe unpickling, allowing only the
  types MMEngine's checkpoints contain;
* distributed training on a machine without CUDA wraps the model in DDP
  without ``device_ids``, which PyTorch requires for CPU modules.

:func:`init_cpu_distributed` starts a gloo process group when CUDA is
unavailable, because MMEngine's ``init_dist`` calls ``torch.cuda.set_device``
for every launcher. :func:`explain_unknown_types` turns MMEngine's
"not in the registry" errors into messages that name the scopes searched
and the closest registered names.
"""
import contextlib
import datetime
import difflib
import os
import os.path as osp
import re
import subprocess
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import mmengine.registry
import torch
import torch.distributed as torch_dist
from mmengine.config import Config
from mmengine.device import get_device
from mmengine.dist import is_main_process, master_only
from mmengine.fileio import LocalBackend, get_file_backend
from mmengine.hooks import CheckpointHook, Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import MODEL_WRAPPERS, RUNNERS, Registry
from mmengine.runner import Runner
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import (LAST_CHECKPOINT, find_resumable_checkpoint,
                         safe_checkpoint_loading, save_atomic,
                         write_text_atomic)

LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')

# How a config names MMEngine's own checkpoint hook.
_CHECKPOINT_HOOK_NAMES = ('CheckpointHook', 'mmengine.CheckpointHook')


class SafeCheckpointHook(CheckpointHook):
    """``CheckpointHook`` that deletes old checkpoints only after a save.

    MMEngine's hook deletes the checkpoints beyond ``max_keep_ckpts`` before
    it saves the new one; with ``max_keep_ckpts=1`` a kill during the save
    leaves no checkpoint at all. Here the new checkpoint is written (by the
    runner, atomically), then ``last_checkpoint`` is replaced atomically,
    and only then are the outdated files deleted. Everything else, the
    arguments included, is ``CheckpointHook``'s.

    Note:
        The best checkpoint of ``save_best`` is still saved as MMEngine does
        it (the previous best is deleted first): resuming uses the regular
        checkpoints, which this hook protects.
    """

    def _save_checkpoint_with_step(self, runner, step: int,
                                   meta: dict) -> None:
        outdated = []
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and
                                            self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                outdated.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids',
                                           list(self.keep_ckpt_ids))

        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir,
                                                     ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        runner.save_checkpoint(
            self.out_dir,
            ckpt_filename,
            self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler,
            meta=meta,
            by_epoch=self.by_epoch,
            backend_args=self.backend_args,
            **self.args)

        if not is_main_process():
            return
        write_text_atomic(self.last_ckpt,
                          osp.join(runner.work_dir, LAST_CHECKPOINT))
        for old_step in outdated:
            path = self.file_backend.join_path(
                self.out_dir, self.filename_tmpl.format(old_step))
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)
            elif self.file_backend.isdir(path):
                # DeepSpeed saves a checkpoint as a directory.
                self.file_backend.rmtree(path)


class PluginRunner(Runner):
    """``Runner`` with atomic checkpoints, safe loading and DDP on CPU.

    Checkpoints are written through a temporary file and a rename, and the
    checkpoint hook deletes outdated checkpoints only after the new one is
    complete (:class:`SafeCheckpointHook`). It takes exactly the arguments
    of :class:`mmengine.runner.Runner` and is built the same way
    (``PluginRunner.from_cfg(cfg)``).
    """

    @master_only
    def save_checkpoint(self,
                        out_dir: str,
                        filename: str,
                        file_client_args: Optional[dict] = None,
                        save_optimizer: bool = True,
                        save_param_scheduler: bool = True,
                        meta: Optional[dict] = None,
                        by_epoch: bool = True,
                        backend_args: Optional[dict] = None) -> None:
        """Save a checkpoint as ``Runner.save_checkpoint`` does, atomically.

        On a local file system the checkpoint is written to a temporary file
        in ``out_dir`` and renamed to ``filename`` once it is complete and
        synced, so a run killed while saving never leaves a truncated
        ``filename``. Other storage backends are written as MMEngine does.
        """
        parent_save = super().save_checkpoint
        kwargs = dict(
            save_optimizer=save_optimizer,
            save_param_scheduler=save_param_scheduler,
            meta=meta,
            by_epoch=by_epoch)
        local = file_client_args is None and isinstance(
            get_file_backend(out_dir, backend_args=backend_args), LocalBackend)
        if not local:
            parent_save(
                out_dir,
                filename,
                file_client_args=file_client_args,
                backend_args=backend_args,
                **kwargs)
            return

        def write(tmp_path: str) -> None:
            parent_save(
                osp.dirname(tmp_path), osp.basename(tmp_path), **kwargs)

        save_atomic(write, osp.join(out_dir, filename))

    def load_checkpoint(self,
                        filename: str,
                        map_location: Union[str, Callable] = 'cpu',
                        strict: bool = False,
                        revise_keys: Optional[List[Tuple[str, str]]] = None):
        """Load a checkpoint as ``Runner.load_checkpoint`` does.

        ``torch.load`` keeps ``weights_only=True``; the non-tensor types that
        MMEngine stores in its checkpoints are allowed
        (:func:`~.checkpoint.safe_checkpoint_loading`), nothing else.
        """
        if revise_keys is None:
            revise_keys = [(r'^module.', '')]
        with safe_checkpoint_loading():
            return super().load_checkpoint(
                filename,
                map_location=map_location,
                strict=strict,
                revise_keys=revise_keys)

    def load_or_resume(self) -> None:
        """Load or resume; auto-resume picks the newest complete checkpoint.

        MMEngine resumes from whatever ``work_dir/last_checkpoint`` names.
        Here a pointer to a missing or truncated file falls back to the
        newest complete ``*.pth`` of ``work_dir``
        (:func:`~.checkpoint.find_resumable_checkpoint`).
        """
        if self._has_loaded or not (self._resume and self._load_from is None):
            super().load_or_resume()
            return

        resume_from = find_resumable_checkpoint(self.work_dir)
        if resume_from is None:
            self.logger.info(
                f'No complete checkpoint in {self.work_dir} to resume from; '
                'training starts from the beginning.')
            return
        self.logger.info(
            f'Auto resumed from the latest checkpoint {resume_from}.')
        self.resume(resume_from)
        self._has_loaded = True

    def register_hook(self,
                      hook: Union[Hook, Dict],
                      priority: Optional[Union[int, str]] = None) -> None:
        """Register a hook; MMEngine's ``CheckpointHook`` becomes
        :class:`SafeCheckpointHook` (same arguments).

        Subclasses of ``CheckpointHook`` and other hooks are registered
        unchanged.
        """
        if isinstance(hook,
                      dict) and (hook.get('type') in _CHECKPOINT_HOOK_NAMES
                                 or hook.get('type') is CheckpointHook):
            hook = dict(hook, type=SafeCheckpointHook)
        super().register_hook(hook, priority)

    def wrap_model(self, model_wrapper_cfg: Optional[Dict],
                   model: torch.nn.Module) -> torch.nn.Module:
        """Wrap the model; on CPU, without the ``device_ids`` of DDP.

        MMEngine passes ``device_ids=[LOCAL_RANK]`` to every
        ``DistributedDataParallel`` wrapper, which PyTorch rejects for a
        module on the CPU. GPU and non-distributed runs are unchanged.

        Note:
            ``cfg.sync_bn`` is not applied on the CPU: PyTorch's
            SyncBatchNorm runs on GPUs only.
        """
        if (not self.distributed or is_model_wrapper(model)
                or get_device() != 'cpu'):
            return super().wrap_model(model_wrapper_cfg, model)

        wrapper_cfg = dict(
            type='MMDistributedDataParallel',
            broadcast_buffers=False,
            find_unused_parameters=self.cfg.get('find_unused_parameters',
                                                False))
        if model_wrapper_cfg is not None:
            wrapper_cfg.update(model_wrapper_cfg)
        wrapper_cls = MODEL_WRAPPERS.get(wrapper_cfg['type'])
        default_args = dict(module=model.to('cpu'))
        if isinstance(wrapper_cls, type) and issubclass(
                wrapper_cls, DistributedDataParallel):
            default_args['device_ids'] = None
        return MODEL_WRAPPERS.build(wrapper_cfg, default_args=default_args)


def load_tool_config(config: str,
                     launcher: str = 'none',
                     cfg_options: Optional[dict] = None,
                     work_dir: Optional[str] = None) -> Config:
    """Load a config as the tools do, with the command line applied.

    Args:
        config (str): Path of the config file.
        launcher (str): The job launcher. Defaults to ``'none'``.
        cfg_options (dict, optional): ``--cfg-options`` to merge.
        work_dir (str, optional): ``--work-dir``; without it the config's
            ``work_dir``, else ``./work_dirs/<config name>``.

    Returns:
        Config: The config, ready for the tool's own changes.
    """
    cfg = Config.fromfile(config)
    cfg.launcher = launcher
    if cfg_options is not None:
        cfg.merge_from_dict(cfg_options)

    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(config))[0])
    return cfg


def build_runner(cfg: Config) -> Runner:
    """Build :class:`PluginRunner`, or ``cfg.runner_type`` if it is set.

    A config that names its own ``runner_type`` gets that runner, as in
    MMDetection's tools, without this module's checkpoint handling.
    """
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return PluginRunner.from_cfg(cfg)


def _slurm_env() -> Dict[str, str]:
    env = dict(
        RANK=os.environ['SLURM_PROCID'],
        WORLD_SIZE=os.environ['SLURM_NTASKS'],
        LOCAL_RANK=os.environ.get('SLURM_LOCALID', '0'))
    if 'MASTER_ADDR' not in os.environ:
        node_list = os.environ['SLURM_NODELIST']
        env['MASTER_ADDR'] = subprocess.getoutput(
            f'scontrol show hostname {node_list} | head -n1')
    return env


def _mpi_env() -> Dict[str, str]:
    return dict(
        RANK=os.environ['OMPI_COMM_WORLD_RANK'],
        WORLD_SIZE=os.environ['OMPI_COMM_WORLD_SIZE'],
        LOCAL_RANK=os.environ['OMPI_COMM_WORLD_LOCAL_RANK'],
        MASTER_ADDR=os.environ.get('MASTER_ADDR', '127.0.0.1'))


def init_cpu_distributed(launcher: str,
                         timeout: Optional[datetime.timedelta] = None) -> bool:
    """Start a gloo process group if ``launcher`` asks for one and CUDA is
    unavailable.

    MMEngine's ``init_dist`` calls ``torch.cuda.set_device`` for every
    launcher, which fails on a CPU build of PyTorch. The ``Runner`` does
    not initialise again once a process group exists, so calling this
    before building the runner makes ``--launcher`` work on CPUs. On a
    machine with CUDA this does nothing and MMEngine initialises NCCL as
    usual.

    Args:
        launcher (str): One of ``'none'``, ``'pytorch'``, ``'slurm'``,
            ``'mpi'``.
        timeout (datetime.timedelta, optional): Timeout of collective
            operations. Defaults to PyTorch's default.

    Returns:
        bool: Whether a process group was started here.

    Raises:
        ValueError: ``launcher`` is not a known launcher, or the
            environment lacks the rank and world size.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(
            f'launcher must be one of {LAUNCHERS}, got {launcher!r}')
    if (launcher == 'none' or torch.cuda.is_available()
            or torch_dist.is_initialized()):
        return False

    if launcher == 'slurm':
        os.environ.update(_slurm_env())
    elif launcher == 'mpi':
        os.environ.update(_mpi_env())
    missing = [k for k in ('RANK', 'WORLD_SIZE') if k not in os.environ]
    if missing:
        raise ValueError(
            f'launcher={launcher!r} needs the environment variables RANK and '
            f'WORLD_SIZE (torchrun sets them), missing: {missing}')
    # 29500 is torch.distributed's default port.
    os.environ.setdefault('MASTER_PORT', '29500')
    os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
    kwargs = {} if timeout is None else dict(timeout=timeout)
    torch_dist.init_process_group(
        backend='gloo',
        init_method='env://',
        rank=int(os.environ['RANK']),
        world_size=int(os.environ['WORLD_SIZE']),
        **kwargs)
    return True


class UnknownTypeError(KeyError):
    """A config names a ``type`` that no registry searched holds."""

    def __str__(self) -> str:
        # KeyError quotes its message; this one is meant to be read.
        return str(self.args[0]) if self.args else ''


_NOT_IN_REGISTRY = re.compile(
    r'(?P<type>[\w.\-]+) is not in the (?:(?P<scope>[\w.\-]+)::)?'
    r'(?P<name>[\w ]+?) registry')
_FAILED_TO_GET = re.compile(r'Failed to get (?P<type>[\w.\-]+)')


def _registry_tree(root: Registry) -> List[Registry]:
    nodes = [root]
    for node in nodes:
        nodes.extend(node._children.values())
    return nodes


def _registries_named(name: Optional[str]) -> List[Registry]:
    """All registries (of all scopes) whose name is ``name``."""
    roots = [
        obj for obj in vars(mmengine.registry).values()
        if isinstance(obj, Registry) and obj.parent is None
    ]
    found = []
    for root in roots:
        if name is None or root.name == name:
            found.extend(_registry_tree(root))
    return found


def _searched_scopes(registry: Registry, type_name: str) -> List[str]:
    """The scopes ``registry.get(type_name)`` looks in, in order."""
    scope, _ = Registry.split_scope_key(type_name)
    if scope is None:
        chain, node = [], registry
        while node is not None:
            chain.append(node.scope)
            node = node.parent
        return chain
    return [scope]


def describe_unknown_type(error: BaseException) -> Optional[str]:
    """A readable message for MMEngine's "not in the registry" errors.

    Args:
        error (BaseException): An exception raised while building from a
            config.

    Returns:
        str or None: The message, or None if ``error`` is not about an
        unknown ``type``.
    """
    text = str(error.args[0]) if error.args else str(error)
    match = _NOT_IN_REGISTRY.search(text) or _FAILED_TO_GET.search(text)
    if match is None:
        return None
    type_name = match.group('type')
    groups = match.groupdict()
    registry_name = groups.get('name')
    if registry_name is None:
        return (f'Unknown type {type_name!r} in the config: no registry '
                'holds it and it cannot be imported as a Python object.')
    candidates = _registries_named(registry_name)
    registry = next((r for r in candidates if r.scope == groups.get('scope')),
                    candidates[0] if candidates else None)
    if registry is None:
        return (f'Unknown type {type_name!r} in the config; no registry '
                f'{registry_name!r} exists.')

    tree = _registry_tree(registry._get_root_registry())
    searched = _searched_scopes(registry, type_name)
    _, short_name = Registry.split_scope_key(type_name)
    known = {}
    for node in tree:
        for key in node.module_dict:
            known.setdefault(key, []).append(f'{node.scope}.{key}')
    close = [
        qualified
        for key in difflib.get_close_matches(short_name, list(known), n=3)
        for qualified in known[key]
    ]
    scopes = ', '.join(sorted({node.scope for node in tree}))
    lines = [
        f'Unknown type {type_name!r} in the config: it is not in the '
        f'{registry.name!r} registry.',
        f'Scopes searched: {", ".join(searched)}.',
        f'Scopes of the {registry.name!r} registry: {scopes}.',
    ]
    if close:
        lines.append(f'Closest registered names: {", ".join(close)}.')
    lines.append('A type of another package needs its scope prefix '
                 "('scope.Type') and the package in custom_imports.")
    return '\n'.join(lines)


@contextlib.contextmanager
def explain_unknown_types() -> Iterator[None]:
    """Re-raise "not in the registry" errors as :class:`UnknownTypeError`.

    Other exceptions pass through unchanged.
    """
    try:
        yield
    except UnknownTypeError:
        raise
    except (KeyError, RuntimeError) as error:
        message = describe_unknown_type(error)
        if message is None:
            raise
        raise UnknownTypeError(message) from error
