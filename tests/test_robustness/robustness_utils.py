"""What the robustness tests share: a tiny config and runs of the tools.

The detector of these tests is an ATSS with a ResNet-18 at an eighth of its
width and GroupNorm everywhere, trained on 64 px synthetic images. ATSS
averages its losses over the positives of all processes (``reduce_mean``)
and GroupNorm works per image, so two processes with one image each compute
the same update as one process with both images: what the distributed test
compares. No augmentation draws random numbers, so a resumed run repeats an
uninterrupted one exactly.
"""
import json
import os
import os.path as osp
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from balanced_l1_plugin.datasets.synthetic import SYNTHETIC_CLASSES

HERE = osp.dirname(osp.abspath(__file__))
REPO_ROOT = osp.dirname(osp.dirname(HERE))

IMAGE_SIZE = 64

TINY_CONFIG = '''\
custom_imports = dict(imports={imports!r}, allow_failed_imports=False)
default_scope = 'mmdet'
classes = {classes!r}
data_root = {data_root!r}
norm_cfg = dict(type='GN', num_groups=4, requires_grad=True)

model = dict(
    type='ATSS',
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=32),
    backbone=dict(
        type='ResNet',
        depth=18,
        base_channels=8,
        num_stages=4,
        out_indices=(1, 2, 3),
        frozen_stages=-1,
        norm_cfg=norm_cfg,
        norm_eval=False,
        style='pytorch',
        init_cfg=None),
    neck=dict(
        type='FPN', in_channels=[16, 32, 64], out_channels=16, num_outs=3),
    bbox_head=dict(
        type='ATSSHead',
        num_classes=len(classes),
        in_channels=16,
        stacked_convs=1,
        feat_channels=16,
        norm_cfg=norm_cfg,
        anchor_generator=dict(
            type='AnchorGenerator',
            ratios=[1.0],
            octave_base_scale=4,
            scales_per_octave=1,
            strides=[8, 16, 32]),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[.0, .0, .0, .0],
            target_stds=[0.1, 0.1, 0.2, 0.2]),
        loss_cls=dict(
            type='FocalLoss',
            use_sigmoid=True,
            gamma=2.0,
            alpha=0.25,
            loss_weight=1.0),
        # ATSS regresses decoded boxes, in pixels.
        loss_bbox=dict(
            type='balanced_l1_plugin.BalancedL1Loss',
            alpha=0.5,
            gamma=1.5,
            beta=1.0,
            loss_weight=0.05),
        loss_centerness=dict(
            type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0)),
    train_cfg=dict(
        assigner=dict(type='ATSSAssigner', topk=9),
        allowed_border=-1,
        pos_weight=-1,
        debug=False),
    test_cfg=dict(
        nms_pre=200,
        min_bbox_size=0,
        # An untrained model scores about 0.01 (the focal loss prior); all
        # its boxes are kept so that the metrics of two runs say something.
        score_thr=0.0,
        nms=dict(type='nms', iou_threshold=0.6),
        max_per_img=20))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=({size}, {size}), keep_ratio=True),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=({size}, {size}), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
train_dataloader = dict(
    batch_size={batch_size},
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True, seed=0),
    dataset=dict(
        type='CocoDataset',
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='CocoDataset',
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        test_mode=True,
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + '/annotations/instances_val.json',
    metric='bbox',
    outfile_prefix={outfile_prefix!r})
test_evaluator = val_evaluator

train_cfg = dict(
    type='IterBasedTrainLoop', max_iters={max_iters},
    val_interval={max_iters})
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4)
]

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=1),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(
        type='CheckpointHook',
        by_epoch=False,
        interval={checkpoint_interval},
        max_keep_ckpts={max_keep_ckpts}),
    sampler_seed=dict(type='DistSamplerSeedHook'))
custom_hooks = {custom_hooks!r}
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='gloo'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(
    type='DetLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=1, by_epoch=False)
log_level = {log_level!r}
load_from = None
resume = False
randomness = dict(seed=0, deterministic=True)
'''


def write_tiny_config(path: str,
                      data_root: str,
                      outfile_prefix: str,
                      batch_size: int = 2,
                      max_iters: int = 6,
                      checkpoint_interval: int = 2,
                      max_keep_ckpts: int = -1,
                      custom_hooks: Optional[List[dict]] = None,
                      imports: Sequence[str] = (),
                      log_level: str = 'INFO') -> str:
    """Write the tiny ATSS config to ``path`` and return ``path``."""
    text = TINY_CONFIG.format(
        classes=tuple(SYNTHETIC_CLASSES),
        data_root=data_root,
        size=IMAGE_SIZE,
        batch_size=batch_size,
        outfile_prefix=outfile_prefix,
        max_iters=max_iters,
        checkpoint_interval=checkpoint_interval,
        max_keep_ckpts=max_keep_ckpts,
        custom_hooks=custom_hooks or [],
        imports=['balanced_l1_plugin', *imports],
        log_level=log_level)
    with open(path, 'w') as f:
        f.write(text)
    return path


def tool_env(**extra: str) -> Dict[str, str]:
    """Environment of a tool run: the venv first, one thread per process.

    One thread makes the CPU kernels' reductions run in the same order in
    every run, whatever else shares the machine.
    """
    env = dict(os.environ)
    env['PATH'] = osp.dirname(sys.executable) + os.pathsep + env['PATH']
    # HERE makes this module importable by a config's custom_imports.
    env['PYTHONPATH'] = os.pathsep.join(
        [REPO_ROOT, HERE, env.get('PYTHONPATH', '')])
    env['OMP_NUM_THREADS'] = '1'
    env['PYTHON'] = sys.executable
    env.update(extra)
    return env


def run_tool(args: List[str],
             timeout: float = 300,
             **env: str) -> subprocess.CompletedProcess:
    """Run a tool of ``tools/`` from the repository root; capture output."""
    if args[0].endswith('.py'):
        args = [sys.executable] + args
    return subprocess.run(
        args,
        cwd=REPO_ROOT,
        env=tool_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout)


def read_scalars(work_dir: str) -> List[dict]:
    """Every record of ``vis_data/scalars.json`` of a work directory."""
    records = []
    for dirpath, _, filenames in os.walk(work_dir):
        if 'scalars.json' in filenames and dirpath.endswith('vis_data'):
            with open(osp.join(dirpath, 'scalars.json')) as f:
                records.extend(json.loads(line) for line in f)
    return records


@HOOKS.register_module()
class SlowTrainingHook(Hook):
    """Sleep after every training iteration, to leave time for a kill."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch=None,
                         outputs=None) -> None:
        time.sleep(self.seconds)


@HOOKS.register_module()
class SigkillOnSaveHook(Hook):
    """SIGKILL the process while it saves the checkpoint of ``at_iter``.

    The runner calls ``before_save_checkpoint`` once the save has begun,
    after MMEngine's own checkpoint hook has deleted the checkpoints beyond
    ``max_keep_ckpts``.
    """

    def __init__(self, at_iter: int) -> None:
        self.at_iter = at_iter

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if runner.iter + 1 == self.at_iter:
            os.kill(os.getpid(), signal.SIGKILL)
