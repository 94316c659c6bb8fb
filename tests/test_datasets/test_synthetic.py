import filecmp
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest

from balanced_l1_plugin.datasets.synthetic import (SYNTHETIC_CLASSES,
                                                   make_synthetic_coco)

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SMALL = dict(num_train=6, num_val=3, image_size=64, progress=False)


def load(path):
    with open(path) as f:
        return json.load(f)


def all_files(root):
    return sorted(
        osp.relpath(osp.join(d, name), root) for d, _, names in os.walk(root)
        for name in names)


@pytest.fixture(scope='module')
def default_dataset(tmp_path_factory):
    """The dataset at its default parameters, as the demo uses it."""
    root = tmp_path_factory.mktemp('synthetic')
    return make_synthetic_coco(str(root), progress=False)


def test_layout_and_paths(tmp_path):
    paths = make_synthetic_coco(str(tmp_path / 'd'), **SMALL)
    root = str(tmp_path / 'd')
    assert paths['data_root'] == root
    assert paths['train_ann'] == osp.join(root, 'annotations',
                                          'instances_train.json')
    assert paths['val_ann'] == osp.join(root, 'annotations',
                                        'instances_val.json')
    assert sorted(os.listdir(osp.join(
        root, 'train'))) == [f'{k:06d}.png' for k in range(6)]
    assert sorted(os.listdir(osp.join(
        root, 'val'))) == [f'{k:06d}.png' for k in range(3)]


@pytest.mark.parametrize('seed', [0, 7])
def test_same_seed_same_bytes(tmp_path, seed):
    a = make_synthetic_coco(str(tmp_path / 'a'), seed=seed, **SMALL)
    b = make_synthetic_coco(str(tmp_path / 'b'), seed=seed, **SMALL)
    files = all_files(a['data_root'])
    assert files == all_files(b['data_root'])
    # 9 images, 2 annotation files and the manifest.
    assert len(files) == 12
    match, mismatch, errors = filecmp.cmpfiles(
        a['data_root'], b['data_root'], files, shallow=False)
    assert (mismatch, errors) == ([], [])


def test_other_seed_other_data(tmp_path):
    a = make_synthetic_coco(str(tmp_path / 'a'), seed=0, **SMALL)
    b = make_synthetic_coco(str(tmp_path / 'b'), seed=1, **SMALL)
    for key in ('train_ann', 'val_ann'):
        assert load(a[key])['annotations'] != load(b[key])['annotations']
    same = filecmp.cmp(
        osp.join(a['data_root'], 'train', '000000.png'),
        osp.join(b['data_root'], 'train', '000000.png'),
        shallow=False)
    assert not same


def test_more_images_keep_the_first(tmp_path):
    small = make_synthetic_coco(str(tmp_path / 'a'), **SMALL)
    large = make_synthetic_coco(
        str(tmp_path / 'b'), **dict(SMALL, num_train=10))
    anns_small = load(small['train_ann'])['annotations']
    anns_large = load(large['train_ann'])['annotations']
    assert anns_large[:len(anns_small)] == anns_small
    assert len(anns_large) > len(anns_small)


@pytest.mark.parametrize('split', ['train', 'val'])
def test_valid_coco(default_dataset, split):
    import cv2
    data = load(default_dataset[f'{split}_ann'])
    images = {img['id']: img for img in data['images']}
    cat_ids = {cat['id'] for cat in data['categories']}
    ann_ids = [ann['id'] for ann in data['annotations']]

    assert len(images) == len(data['images']) == dict(train=200, val=50)[split]
    assert len(set(ann_ids)) == len(ann_ids)
    assert [cat['name']
            for cat in data['categories']] == list(SYNTHETIC_CLASSES)
    for img in data['images'][:5]:
        pixels = cv2.imread(
            osp.join(default_dataset[f'{split}_img_dir'], img['file_name']))
        assert pixels.shape == (img['height'], img['width'], 3) == (128, 128,
                                                                    3)
    for ann in data['annotations']:
        x, y, w, h = ann['bbox']
        img = images[ann['image_id']]
        assert ann['category_id'] in cat_ids
        assert w > 0 and h > 0 and ann['area'] == w * h
        assert x >= 0 and y >= 0
        assert x + w <= img['width'] and y + h <= img['height']
        assert ann['iscrowd'] == 0
    # Every image has at least one object.
    assert {ann['image_id'] for ann in data['annotations']} == set(images)


def test_varied_objects(default_dataset):
    data = load(default_dataset['train_ann'])
    boxes = np.array([ann['bbox'] for ann in data['annotations']], float)
    areas = boxes[:, 2] * boxes[:, 3]
    aspect = boxes[:, 2] / boxes[:, 3]
    per_image = np.bincount([ann['image_id'] for ann in data['annotations']])
    labels = np.bincount([ann['category_id'] for ann in data['annotations']])

    # COCO's small, medium and large ranges are all populated.
    assert (areas < 32**2).sum() > 100
    assert ((areas >= 32**2) & (areas < 96**2)).sum() > 100
    assert (areas >= 96**2).sum() > 5
    assert aspect.min() < 0.6 and aspect.max() > 1.7
    assert per_image[1:].min() == 1 and per_image.max() >= 7
    # Four classes, each a fifth to a third of the objects.
    assert np.all(labels[1:] > 0.2 * len(boxes))
    assert np.all(labels[1:] < 0.33 * len(boxes))

    # Some boxes overlap, as in real scenes.
    overlapping = 0
    for img_id in range(1, 51):
        b = boxes[[a['image_id'] == img_id for a in data['annotations']]]
        lt = np.maximum(b[:, None, :2], b[None, :, :2])
        rb = np.minimum(b[:, None, :2] + b[:, None, 2:],
                        b[None, :, :2] + b[None, :, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
        overlapping += int((np.triu(inter, 1) > 0).sum())
    assert overlapping > 20


def test_cached_call_rewrites_nothing(tmp_path):
    paths = make_synthetic_coco(str(tmp_path), **SMALL)
    files = all_files(str(tmp_path))
    mtimes = {f: os.stat(tmp_path / f).st_mtime_ns for f in files}
    os.utime(paths['train_ann'], ns=(1, 1))

    again = make_synthetic_coco(str(tmp_path), **SMALL)
    assert again == paths
    assert os.stat(paths['train_ann']).st_mtime_ns == 1
    mtimes.pop(osp.relpath(paths['train_ann'], str(tmp_path)))
    assert {f: os.stat(tmp_path / f).st_mtime_ns for f in mtimes} == mtimes


@pytest.mark.parametrize('change', [
    dict(seed=3),
    dict(num_train=4),
    dict(num_val=5),
    dict(image_size=96),
])
def test_changed_parameters_regenerate(tmp_path, change):
    make_synthetic_coco(str(tmp_path), **SMALL)
    params = dict(SMALL, **change)
    paths = make_synthetic_coco(str(tmp_path), **params)
    fresh = make_synthetic_coco(str(tmp_path / 'fresh'), **params)

    manifest = load(paths['manifest'])
    for key in ('seed', 'num_train', 'num_val', 'image_size'):
        assert manifest[key] == params.get(key, 0)
    for key in ('train_ann', 'val_ann'):
        assert load(paths[key]) == load(fresh[key])


@pytest.mark.parametrize('damage', ['missing_image', 'bad_manifest'])
def test_damaged_cache_regenerates(tmp_path, damage):
    paths = make_synthetic_coco(str(tmp_path), **SMALL)
    image = osp.join(paths['train_img_dir'], '000003.png')
    original = open(image, 'rb').read()
    if damage == 'missing_image':
        os.remove(image)
    else:
        with open(paths['manifest'], 'w') as f:
            f.write('{not json')

    make_synthetic_coco(str(tmp_path), **SMALL)
    assert open(image, 'rb').read() == original
    assert load(paths['manifest'])['num_train'] == 6


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(num_train=-1), ValueError, 'num_train must be >= 0, got -1'),
    (dict(num_val=2.0), TypeError, 'num_val must be an int, got 2.0'),
    (dict(image_size=16), ValueError, 'image_size must be >= 32, got 16'),
    (dict(seed=-3), ValueError, 'seed must be >= 0, got -3'),
    (dict(seed=True), TypeError, 'seed must be an int, got True'),
])
def test_bad_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        make_synthetic_coco(str(tmp_path), **kwargs)
    assert not osp.exists(tmp_path / 'manifest.json')


def test_loads_in_mmdet_coco_dataset(tmp_path):
    from mmdet.datasets import CocoDataset
    paths = make_synthetic_coco(str(tmp_path), **SMALL)
    dataset = CocoDataset(
        data_root=paths['data_root'],
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        metainfo=dict(classes=SYNTHETIC_CLASSES),
        pipeline=[])
    coco = load(paths['train_ann'])

    assert len(dataset) == 6
    assert dataset.metainfo['classes'] == SYNTHETIC_CLASSES
    info = dataset[0]
    assert osp.isfile(info['img_path'])
    expected = [[x, y, x + w, y + h] for ann in coco['annotations']
                if ann['image_id'] == 1 for x, y, w, h in [ann['bbox']]]
    assert [inst['bbox'] for inst in info['instances']] == expected
    labels = [
        ann['category_id'] - 1 for ann in coco['annotations']
        if ann['image_id'] == 1
    ]
    assert [inst['bbox_label'] for inst in info['instances']] == labels


def test_ground_truth_scores_full_ap_in_coco_metric(tmp_path):
    import torch
    from mmdet.evaluation import CocoMetric
    paths = make_synthetic_coco(str(tmp_path), **SMALL)
    coco = load(paths['val_ann'])
    metric = CocoMetric(ann_file=paths['val_ann'], metric='bbox')
    metric.dataset_meta = dict(classes=SYNTHETIC_CLASSES)

    samples = []
    for img in coco['images']:
        anns = [a for a in coco['annotations'] if a['image_id'] == img['id']]
        bboxes = torch.tensor([[x, y, x + w, y + h]
                               for x, y, w, h in (a['bbox'] for a in anns)],
                              dtype=torch.float32)
        samples.append(
            dict(
                img_id=img['id'],
                ori_shape=(img['height'], img['width']),
                pred_instances=dict(
                    bboxes=bboxes,
                    scores=torch.ones(len(anns)),
                    labels=torch.tensor([a['category_id'] - 1
                                         for a in anns]))))
    metric.process({}, samples)
    results = metric.evaluate(len(samples))

    assert results['coco/bbox_mAP'] == pytest.approx(1.0)
    assert results['coco/bbox_mAP_75'] == pytest.approx(1.0)


def test_cli(tmp_path):
    root = tmp_path / 'cli'
    out = subprocess.run([
        sys.executable,
        osp.join(REPO_ROOT, 'tools', 'make_synthetic_dataset.py'), '--root',
        str(root), '--num-train', '3', '--num-val', '2', '--image-size', '48',
        '--seed', '5'
    ],
                         check=True,
                         capture_output=True,
                         text=True).stdout
    assert f'train_ann: {root}/annotations/instances_train.json' in out
    manifest = load(root / 'manifest.json')
    assert (manifest['num_train'], manifest['num_val'], manifest['image_size'],
            manifest['seed']) == (3, 2, 48, 5)
    assert len(load(root / 'annotations' /
                    'instances_val.json')['images']) == 2
