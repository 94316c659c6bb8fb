# Copyright (c) balanced_l1_plugin authors. All rights reserved.
"""Train a detector with MMEngine's Runner, as MMDetection's train.py does.

The flags are MMDetection 3.x's. In addition to what MMDetection's tool
does, this one registers the plugin itself (a config without
``custom_imports`` still finds ``balanced_l1_plugin.BalancedL1Loss``),
checks the annotation files before anything is built, stops at the first
non-finite regression input (``NonFiniteCheckHook``, ``--no-finite-check``
to leave it out), trains ``--amp`` on the CPU with bfloat16 autocast,
names the registry scopes searched when a config names an unknown ``type``,
writes checkpoints
atomically, resumes under PyTorch's safe ``torch.load`` and trains with
``--launcher pytorch`` on machines without CUDA (gloo).
"""
import argparse
import os

import torch
from mmdet.utils import setup_cache_size_limit_of_dynamo
from mmengine.config import Config, DictAction

import balanced_l1_plugin  # noqa: F401  (registers the plugin's modules)
from balanced_l1_plugin.datasets.checks import check_data_cfg
from balanced_l1_plugin.engine.runner import (LAUNCHERS, build_runner,
                                              explain_unknown_types,
                                              init_cpu_distributed,
                                              load_tool_config)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--amp',
        action='store_true',
        default=False,
        help='enable automatic-mixed-precision training')
    parser.add_argument(
        '--no-finite-check',
        action='store_true',
        help='do not add NonFiniteCheckHook, which stops training at the '
        'first NaN or Inf in a regression loss input or a loss')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='enable automatically scaling LR.')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from this checkpoint; without a path, resume from the '
        'newest complete checkpoint in the work directory')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, as key=value pairs merged '
        'into it, e.g. model.roi_head.bbox_head.loss_bbox.alpha=0.3. A list '
        'is written key="[a,b]" or key=a,b, nested lists and tuples as '
        'key="[(a,b),(c,d)]"; the quotes are needed and no white space is '
        'allowed.')
    parser.add_argument(
        '--launcher', choices=LAUNCHERS, default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank since PyTorch 2.0, older
    # launchers --local_rank.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_cfg(args: argparse.Namespace) -> Config:
    """The config of ``args.config`` with the command line applied."""
    cfg = load_tool_config(args.config, args.launcher, args.cfg_options,
                           args.work_dir)

    if args.amp:
        if torch.cuda.is_available():
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
        else:
            # MMEngine's AmpOptimWrapper asserts a GPU; bfloat16 autocast
            # on the CPU needs no loss scale.
            cfg.optim_wrapper.type = 'balanced_l1_plugin.CPUAmpOptimWrapper'

    if not args.no_finite_check:
        hooks = list(cfg.get('custom_hooks', None) or [])
        if not any(
                str(hook.get('type', '')).endswith('NonFiniteCheckHook')
                for hook in hooks):
            hooks.append(dict(type='balanced_l1_plugin.NonFiniteCheckHook'))
        cfg.custom_hooks = hooks

    if args.auto_scale_lr:
        auto_scale_lr = cfg.get('auto_scale_lr', None)
        if (not auto_scale_lr or 'enable' not in auto_scale_lr
                or 'base_batch_size' not in auto_scale_lr):
            raise ValueError(
                '--auto-scale-lr needs auto_scale_lr = dict(enable=..., '
                'base_batch_size=...) in the config, got auto_scale_lr='
                f'{auto_scale_lr!r}')
        cfg.auto_scale_lr.enable = True

    # A resume path wins over auto-resume.
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    return cfg


def main() -> None:
    args = parse_args()

    # Fewer recompilations of torch.compile'd models.
    setup_cache_size_limit_of_dynamo()

    cfg = build_cfg(args)
    check_data_cfg(cfg)
    init_cpu_distributed(args.launcher)

    with explain_unknown_types():
        runner = build_runner(cfg)
        runner.train()


if __name__ == '__main__':
    main()
