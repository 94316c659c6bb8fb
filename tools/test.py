# Copyright (c) balanced_l1_plugin authors. All rights reserved.
"""Test (and evaluate) a detector, as MMDetection's test.py does.

Registers the plugin itself, checks the annotation files first, loads the
checkpoint under PyTorch's safe ``torch.load`` (allowing only the types
MMEngine's checkpoints contain) and runs with ``--launcher pytorch`` on
machines without CUDA (gloo).
"""
import argparse
import os
import warnings
from copy import deepcopy

from mmdet.engine.hooks.utils import trigger_visualization_hook
from mmdet.evaluation import DumpDetResults
from mmdet.utils import setup_cache_size_limit_of_dynamo
from mmengine.config import Config, ConfigDict, DictAction

import balanced_l1_plugin  # noqa: F401  (registers the plugin's modules)
from balanced_l1_plugin.datasets.checks import check_data_cfg
from balanced_l1_plugin.engine.runner import (LAUNCHERS, build_runner,
                                              explain_unknown_types,
                                              init_cpu_distributed,
                                              load_tool_config)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Test (and evaluate) a detector')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir',
        help='the directory to save the file containing evaluation metrics')
    parser.add_argument(
        '--out',
        type=str,
        help='dump predictions to a pickle file (.pkl or .pickle) for '
        'offline evaluation')
    parser.add_argument(
        '--show', action='store_true', help='show prediction results')
    parser.add_argument(
        '--show-dir',
        help='directory, under work_dir/<timestamp>/, where painted images '
        'are saved')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, as key=value pairs merged '
        'into it. A list is written key="[a,b]" or key=a,b, nested lists '
        'and tuples as key="[(a,b),(c,d)]"; the quotes are needed and no '
        'white space is allowed.')
    parser.add_argument(
        '--launcher', choices=LAUNCHERS, default='none', help='job launcher')
    parser.add_argument(
        '--tta', action='store_true', help='test-time augmentation (flip)')
    # torch.distributed.launch passes --local-rank since PyTorch 2.0, older
    # launchers --local_rank.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        parser.error(f'--out must end with .pkl or .pickle, got {args.out!r}')
    return args


def apply_tta(cfg: Config) -> Config:
    """Wrap the model in ``DetTTAModel`` with flip test-time augmentation."""
    if 'tta_model' not in cfg:
        warnings.warn('No tta_model in the config; using DetTTAModel with '
                      'NMS at IoU 0.5 and 100 boxes per image.')
        cfg.tta_model = dict(
            type='DetTTAModel',
            tta_cfg=dict(
                nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
    if 'tta_pipeline' not in cfg:
        warnings.warn('No tta_pipeline in the config; using the test '
                      'pipeline with and without a horizontal flip.')
        test_data_cfg = cfg.test_dataloader.dataset
        while 'dataset' in test_data_cfg:
            test_data_cfg = test_data_cfg['dataset']
        cfg.tta_pipeline = deepcopy(test_data_cfg.pipeline)
        cfg.tta_pipeline[-1] = dict(
            type='TestTimeAug',
            transforms=[
                [
                    dict(type='RandomFlip', prob=1.),
                    dict(type='RandomFlip', prob=0.)
                ],
                [
                    dict(
                        type='PackDetInputs',
                        meta_keys=('img_id', 'img_path', 'ori_shape',
                                   'img_shape', 'scale_factor', 'flip',
                                   'flip_direction'))
                ],
            ])
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    return cfg


def build_cfg(args: argparse.Namespace) -> Config:
    """The config of ``args.config`` with the command line applied."""
    cfg = load_tool_config(args.config, args.launcher, args.cfg_options,
                           args.work_dir)

    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        cfg = trigger_visualization_hook(cfg, args)
    if args.tta:
        cfg = apply_tta(cfg)
    return cfg


def main() -> None:
    args = parse_args()

    # Fewer recompilations of torch.compile'd models.
    setup_cache_size_limit_of_dynamo()

    cfg = build_cfg(args)
    # Testing reads the test data only; the training set may be absent.
    check_data_cfg(cfg, splits=('test', ))
    init_cpu_distributed(args.launcher)

    with explain_unknown_types():
        runner = build_runner(cfg)
        if args.out is not None:
            runner.test_evaluator.metrics.append(
                DumpDetResults(out_file_path=args.out))
        runner.test()


if __name__ == '__main__':
    main()
