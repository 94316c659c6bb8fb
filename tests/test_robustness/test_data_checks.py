"""Bad data and bad settings fail before any training step, saying why."""
import copy
import json
import math
import os
import os.path as osp
import re

import pytest
from mmengine.config import Config
from robustness_utils import run_tool

from balanced_l1_plugin.datasets.checks import (check_coco_annotations,
                                                check_data_cfg,
                                                check_optim_cfg)


def load_json(path: str):
    with open(path) as f:
        return json.load(f)


@pytest.fixture
def broken_root(synthetic_root, tmp_path):
    """Factory: a copy of the dataset whose train annotations ``edit``
    changes; the images are links to the originals."""

    def make(edit=None, text=None) -> str:
        root = tmp_path / 'data'
        (root / 'annotations').mkdir(parents=True)
        for split in ('train', 'val'):
            os.symlink(osp.join(synthetic_root, split), root / split)
            name = f'annotations/instances_{split}.json'
            ann = load_json(osp.join(synthetic_root, name))
            content = json.dumps(ann)
            if split == 'train' and edit is not None:
                edit(ann)
                content = json.dumps(ann)
            if split == 'train' and text is not None:
                content = text
            (root / name).write_text(content)
        return str(root)

    return make


def config_for(tiny_config, data_root: str) -> Config:
    cfg = Config.fromfile(tiny_config())
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[key].dataset.data_root = data_root
    for key in ('val_evaluator', 'test_evaluator'):
        cfg[key].ann_file = osp.join(data_root,
                                     'annotations/instances_val.json')
    return cfg


def test_good_config_passes(tiny_config, synthetic_root):
    cfg = Config.fromfile(tiny_config())
    assert check_data_cfg(cfg) is None


def missing_image(ann):
    ann['images'].append(
        dict(id=1000, file_name='gone.png', width=64, height=64))


def negative_width(ann):
    ann['annotations'][3]['bbox'][2] = -5


def negative_height(ann):
    ann['annotations'][0]['bbox'][3] = -0.5


def unknown_category(ann):
    ann['annotations'][1]['category_id'] = 99


def unknown_image(ann):
    ann['annotations'][2]['image_id'] = 5000


def short_bbox(ann):
    ann['annotations'][2]['bbox'] = [1, 2, 3]


def nan_bbox(ann):
    ann['annotations'][2]['bbox'][0] = math.nan


def renamed_category(ann):
    ann['categories'][0]['name'] = 'square'


def no_images(ann):
    del ann['images']


@pytest.mark.parametrize('edit, error, pattern', [
    (missing_image, FileNotFoundError,
     r"1 image\(s\) not found:\n  images\[16\] \(id=1000\): "
     r"'.*/train/gone\.png' does not exist"),
    (negative_width, ValueError,
     r"annotations\[3\] \(id=4\) of image '\d+\.png': bbox .*-5.* "
     r'negative width or height'),
    (negative_height, ValueError, r'annotations\[0\] .*-0\.5.*negative'),
    (unknown_category, ValueError,
     r'annotations\[1\] .*category_id 99 is not in categories '
     r'\(ids \[1, 2, 3, 4\]\)'),
    (unknown_image, ValueError,
     r'annotations\[2\] \(id=3\): image_id 5000 is not the id of an '
     'image'),
    (short_bbox, ValueError,
     r'bbox must be \[x, y, width, height\], got \[1, 2, 3\]'),
    (nan_bbox, ValueError, 'bbox has a non-finite value'),
    (renamed_category, ValueError,
     r"1 of the 4 classes of the dataset's metainfo are not category names "
     r"of the file: \['rectangle'\]; the file has \['cross', 'ellipse', "
     r"'square', 'triangle'\]"),
    (no_images, ValueError, 'not in COCO format'),
])
def test_bad_annotations_name_file_and_problem(tiny_config, broken_root, edit,
                                               error, pattern):
    root = broken_root(edit)
    cfg = config_for(tiny_config, root)
    ann_file = osp.join(root, 'annotations', 'instances_train.json')
    with pytest.raises(error, match=pattern) as info:
        check_data_cfg(cfg)
    message = str(info.value)
    assert message.startswith(
        f"train_dataloader.dataset: annotation file '{ann_file}'")


def test_many_problems_are_counted(tiny_config, broken_root):

    def edit(ann):
        for obj in ann['annotations'][:8]:
            obj['bbox'][2] = -1

    cfg = config_for(tiny_config, broken_root(edit))
    with pytest.raises(ValueError, match='has 8 bad annotation') as info:
        check_data_cfg(cfg)
    assert str(info.value).endswith('... and 3 more')
    assert len(re.findall('negative width', str(info.value))) == 5


def test_missing_annotation_file(tiny_config, synthetic_root):
    cfg = Config.fromfile(tiny_config())
    cfg.train_dataloader.dataset.ann_file = 'annotations/nope.json'
    path = osp.join(synthetic_root, 'annotations/nope.json')
    with pytest.raises(
            FileNotFoundError,
            match=f"train_dataloader.dataset.ann_file: annotation file "
            f"'{re.escape(path)}' does not exist"):
        check_data_cfg(cfg)


@pytest.mark.parametrize('text', ['{"images": [', '', '\x00\x01'])
def test_malformed_json(tiny_config, broken_root, text):
    cfg = config_for(tiny_config, broken_root(text=text))
    with pytest.raises(
            ValueError,
            match=r"train_dataloader.dataset.ann_file: '.*instances_train"
            r"\.json' is not valid JSON: "):
        check_data_cfg(cfg)


def test_missing_evaluator_file(tiny_config):
    cfg = Config.fromfile(tiny_config())
    cfg.val_evaluator.ann_file = '/no/such/instances_val.json'
    with pytest.raises(
            FileNotFoundError,
            match="val_evaluator.ann_file: annotation file "
            "'/no/such/instances_val.json' does not exist"):
        check_data_cfg(cfg)


def test_missing_img_prefix(tiny_config):
    cfg = Config.fromfile(tiny_config())
    cfg.val_dataloader.dataset.data_prefix = dict(img_path='val/')
    with pytest.raises(
            ValueError,
            match='val_dataloader.dataset.data_prefix must have the key '
            '"img"'):
        check_data_cfg(cfg)


@pytest.mark.parametrize('wrapper', ['RepeatDataset', 'ConcatDataset'])
def test_wrapped_datasets_are_checked(tiny_config, broken_root, wrapper):
    cfg = Config.fromfile(tiny_config())
    good = cfg.train_dataloader.dataset
    bad = copy.deepcopy(good)
    bad.data_root = broken_root(negative_width)
    if wrapper == 'RepeatDataset':
        cfg.train_dataloader.dataset = dict(type=wrapper, times=2, dataset=bad)
        where = 'train_dataloader.dataset.dataset'
    else:
        cfg.train_dataloader.dataset = dict(type=wrapper, datasets=[good, bad])
        where = r'train_dataloader.dataset.datasets\[1\]'
    with pytest.raises(
            ValueError, match=f'(?s)^{where}: annotation file .*'
            'negative width'):
        check_data_cfg(cfg)


def test_splits_limit_what_is_checked(tiny_config, broken_root):
    cfg = config_for(tiny_config, broken_root(negative_width))
    check_data_cfg(cfg, splits=('val', 'test'))
    with pytest.raises(ValueError, match='negative width'):
        check_data_cfg(cfg, splits=('train', ))
    with pytest.raises(TypeError, match='splits must be a subset'):
        check_data_cfg(cfg, splits=('training', ))


@pytest.mark.parametrize('variable', ['RANK', 'SLURM_PROCID'])
def test_only_rank_0_reads_the_files(tiny_config, broken_root, monkeypatch,
                                     variable):
    root = broken_root(negative_width)
    cfg = config_for(tiny_config, root)
    monkeypatch.setenv(variable, '1')
    check_data_cfg(cfg)
    cfg.train_dataloader.dataset.ann_file = 'annotations/nope.json'
    with pytest.raises(FileNotFoundError, match='nope.json'):
        check_data_cfg(cfg)

    cfg = config_for(tiny_config, root)
    monkeypatch.setenv(variable, '0')
    with pytest.raises(ValueError, match='negative width'):
        check_data_cfg(cfg)


def test_test_dev_file_without_annotations(tmp_path):
    ann = dict(
        images=[dict(id=1, file_name='a.png', width=8, height=8)],
        categories=[dict(id=1, name='a')])
    (tmp_path / 'a.png').write_bytes(b'')
    check_coco_annotations(ann, 'test-dev.json', str(tmp_path), ('a', ))


def test_zero_size_boxes_are_left_to_mmdet(tmp_path):
    # MMDetection drops boxes under 1 px itself; COCO has some.
    ann = dict(
        images=[dict(id=1, file_name='a.png', width=8, height=8)],
        annotations=[
            dict(id=1, image_id=1, category_id=1, bbox=[1, 1, 0, 0.5])
        ],
        categories=[dict(id=1, name='a')])
    check_coco_annotations(ann, 'x.json')


@pytest.mark.parametrize('lr', [-0.02, 0, math.nan, math.inf, '0.02', True])
def test_bad_learning_rate(tiny_config, lr):
    cfg = Config.fromfile(tiny_config())
    cfg.optim_wrapper.optimizer.lr = lr
    pattern = re.escape(
        f'optim_wrapper.optimizer.lr must be a finite number > 0, got {lr!r}')
    with pytest.raises(ValueError, match=pattern):
        check_optim_cfg(cfg)
    with pytest.raises(ValueError, match=pattern):
        check_data_cfg(cfg)
    # Testing does not use the optimizer.
    check_data_cfg(cfg, splits=('test', ))


def test_learning_rate_of_each_optimizer(tiny_config):
    cfg = Config.fromfile(tiny_config())
    cfg.optim_wrapper = dict(
        constructor='MultiOptimWrapperConstructor',
        generator=dict(optimizer=dict(type='SGD', lr=0.1)),
        discriminator=dict(optimizer=dict(type='SGD', lr=-1.0)))
    with pytest.raises(
            ValueError,
            match=r'optim_wrapper.discriminator.optimizer.lr must be .* got '
            r'-1.0'):
        check_optim_cfg(cfg)


@pytest.mark.parametrize('loss_bbox, error, pattern', [
    (dict(alpha=-0.5), ValueError, 'alpha must be finite and > 0, got -0.5'),
    (dict(gamma=math.inf), ValueError,
     'gamma must be finite and > 0, got inf'),
    (dict(loss_weight=-1.0), ValueError, 'loss_weight must be a finite'),
    (dict(reduction='avg'), ValueError, 'reduction must be one of'),
    (dict(type='balanced_l1_plugin.BalancedL1'), KeyError,
     "Unknown type 'balanced_l1_plugin.BalancedL1' in the config"),
])
def test_bad_loss_fails_when_the_runner_is_built(tiny_config, tmp_path,
                                                 loss_bbox, error, pattern):
    from balanced_l1_plugin.engine.runner import (build_runner,
                                                  explain_unknown_types)
    cfg = Config.fromfile(tiny_config())
    cfg.model.bbox_head.loss_bbox.update(loss_bbox)
    cfg.work_dir = str(tmp_path / 'work')
    cfg.experiment_name = cfg.visualizer.name = tmp_path.name
    with pytest.raises(error, match=pattern):
        with explain_unknown_types():
            build_runner(cfg)


@pytest.mark.slow
@pytest.mark.parametrize('option, error, pattern', [
    ('train_dataloader.dataset.data_prefix.img=nowhere/', 'FileNotFoundError',
     r"16 image\(s\) not found:\n  images\[0\] "
     r"\(id=1\): '.*/nowhere/000000.png' does not exist"),
    ('optim_wrapper.optimizer.lr=-0.01', 'ValueError',
     'optim_wrapper.optimizer.lr must be a finite number > 0, got -0.01'),
    ('model.bbox_head.loss_bbox.type=balanced_l1_plugin.BalancedL1',
     'UnknownTypeError',
     "Unknown type 'balanced_l1_plugin.BalancedL1' in the config"),
])
def test_train_tool_fails_before_training(tiny_config, tmp_path, option, error,
                                          pattern):
    work_dir = tmp_path / 'work'
    result = run_tool([
        'tools/train.py',
        tiny_config(), '--work-dir',
        str(work_dir), '--cfg-options', option
    ])
    assert result.returncode != 0
    assert re.search(f'{error}: .*{pattern}', result.stdout), \
        result.stdout[-3000:]
    assert 'Iter(train)' not in result.stdout
    assert not list(work_dir.glob('*.pth'))
