"""A small synthetic detection dataset in COCO format, made from a seed.

Every image is drawn with numpy and OpenCV: a textured, noisy background,
a few line and outline distractors, and one to eight filled objects of the
classes in :data:`SYNTHETIC_CLASSES`, in random colours, sizes and aspect
ratios, partly overlapping. Each box is the tight box of the object's full
(amodal) shape, taken from its rasterised mask: the boxes carry no label
noise, so AP at IoU 0.75 and above measures localisation alone.

Image ``k`` of a split is drawn from its own generator, seeded from
``(seed, split, k)``: the same seed gives the same bytes (with the same
numpy and OpenCV), and the first ``n`` images of a split do not depend on
how many follow.
"""
import json
import os
import os.path as osp
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from mmengine.utils import ProgressBar

SYNTHETIC_CLASSES = ('rectangle', 'ellipse', 'triangle', 'cross')

# Bump when the drawing changes, so that cached files of an older
# generator are regenerated instead of reused.
GENERATOR_VERSION = 1

MANIFEST_NAME = 'manifest.json'

_SPLIT_IDS = {'train': 0, 'val': 1}

# Object sides are drawn log-uniformly between these fractions of the
# image side, which covers COCO's small (< 32 px) to large (> 96 px)
# ranges at the default 128 px.
_MIN_SIDE, _MAX_SIDE = 0.08, 0.8

# A new object is moved when its box overlaps a placed one's above this
# IoU, or when it would leave less than this fraction of a placed object's
# pixels in view: heavier occlusion would hide the shape a box stands for.
_MAX_IOU = 0.4
_MIN_VISIBLE = 0.6

_MAX_OBJECTS = 8

# Smallest difference, on the most different channel, between an object's
# colour and the mean colour behind it: fainter objects would be noise.
_MIN_CONTRAST = 60


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f'{name} must be an int, got {value!r} of type '
                        f'{type(value).__name__}')
    if value < minimum:
        raise ValueError(f'{name} must be >= {minimum}, got {value!r}')
    return int(value)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth colour gradient, soft colour blobs and pixel noise."""
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    start = rng.uniform(40, 200, size=3).astype(np.float32)
    end = rng.uniform(40, 200, size=3).astype(np.float32)
    if rng.random() < 0.5:
        ramp = ramp[:, None, None] * np.ones((1, size, 1), np.float32)
    else:
        ramp = ramp[None, :, None] * np.ones((size, 1, 1), np.float32)
    img = start + (end - start) * ramp

    # Low-frequency texture: coarse noise, upsampled bicubically.
    cells = max(2, size // 16)
    coarse = rng.normal(0, 25, size=(cells, cells, 3)).astype(np.float32)
    img += cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)

    img += rng.normal(0, 8, size=img.shape).astype(np.float32)
    return img


def _random_color(rng: np.random.Generator) -> Tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def _contrasting_color(rng: np.random.Generator,
                       behind: np.ndarray) -> np.ndarray:
    """A random colour at least ``_MIN_CONTRAST`` away from ``behind``."""
    for _ in range(20):
        color = np.array(_random_color(rng), np.float32)
        if np.abs(color - behind).max() >= _MIN_CONTRAST:
            break
    return color


def _draw_distractors(rng: np.random.Generator, img: np.ndarray) -> None:
    """Lines and hollow outlines: edges that belong to no object."""
    size = img.shape[0]
    for _ in range(int(rng.integers(2, 7))):
        color = _random_color(rng)
        thickness = int(rng.integers(1, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            p1 = tuple(int(v) for v in rng.integers(0, size, 2))
            p2 = tuple(int(v) for v in rng.integers(0, size, 2))
            cv2.line(img, p1, p2, color, thickness, cv2.LINE_AA)
        elif kind == 1:
            center = tuple(int(v) for v in rng.integers(0, size, 2))
            radius = int(rng.integers(3, max(4, size // 5)))
            cv2.circle(img, center, radius, color, thickness, cv2.LINE_AA)
        else:
            x0, y0 = (int(v) for v in rng.integers(0, size - 4, 2))
            w, h = (int(v) for v in rng.integers(4, max(5, size // 4), 2))
            cv2.rectangle(img, (x0, y0), (x0 + w, y0 + h), color, thickness)


def _shape_mask(label: int, w: int, h: int,
                rng: np.random.Generator) -> np.ndarray:
    """Mask of one object of class ``label`` filling a ``w`` x ``h`` box."""
    mask = np.zeros((h, w), np.uint8)
    name = SYNTHETIC_CLASSES[label]
    if name == 'rectangle':
        mask[:] = 1
    elif name == 'ellipse':
        center = ((w - 1) / 2, (h - 1) / 2)
        cv2.ellipse(mask, (center, (w, h), 0.0), 1, -1)
    elif name == 'triangle':
        # Apex on one side of the box, base on the opposite side.
        side = int(rng.integers(0, 4))
        t = float(rng.uniform(0, 1))
        if side == 0:
            pts = [(t * (w - 1), 0), (0, h - 1), (w - 1, h - 1)]
        elif side == 1:
            pts = [(t * (w - 1), h - 1), (0, 0), (w - 1, 0)]
        elif side == 2:
            pts = [(0, t * (h - 1)), (w - 1, 0), (w - 1, h - 1)]
        else:
            pts = [(w - 1, t * (h - 1)), (0, 0), (0, h - 1)]
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    else:
        arm_w = max(1, int(round(w * rng.uniform(0.25, 0.4))))
        arm_h = max(1, int(round(h * rng.uniform(0.25, 0.4))))
        x0 = (w - arm_w) // 2
        y0 = (h - arm_h) // 2
        mask[:, x0:x0 + arm_w] = 1
        mask[y0:y0 + arm_h, :] = 1
    return mask


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``(x1, y1, x2, y2)`` box with each row of ``boxes``."""
    if len(boxes) == 0:
        return np.zeros(0)
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / (area + areas - inter)


def _sample_sizes(rng: np.random.Generator, size: int,
                  num: int) -> List[Tuple[int, int]]:
    """``num`` (w, h) pairs, largest area first."""
    min_side = max(4, int(round(_MIN_SIDE * size)))
    max_side = max(min_side + 1, int(round(_MAX_SIDE * size)))
    sides = np.exp(rng.uniform(np.log(min_side), np.log(max_side), num))
    aspects = np.exp(rng.uniform(np.log(0.5), np.log(2.0), num))
    sizes = [(int(np.clip(round(s * np.sqrt(a)), min_side, size)),
              int(np.clip(round(s / np.sqrt(a)), min_side, size)))
             for s, a in zip(sides, aspects)]
    # Large objects go down first so that the small ones stay in view.
    return sorted(sizes, key=lambda wh: -wh[0] * wh[1])


def _place(rng: np.random.Generator, owner: np.ndarray, areas: List[int],
           boxes: np.ndarray, mask: np.ndarray) -> Optional[np.ndarray]:
    """Find a spot for ``mask`` that hides no earlier object too much.

    Returns the ``(x1, y1, x2, y2)`` box of the spot, or None after a few
    failed tries.
    """
    size = owner.shape[0]
    h, w = mask.shape
    for _ in range(10):
        x0 = int(rng.integers(0, size - w + 1))
        y0 = int(rng.integers(0, size - h + 1))
        box = np.array([x0, y0, x0 + w, y0 + h], dtype=np.float64)
        if (_iou(box, boxes) > _MAX_IOU).any():
            continue
        covered = owner[y0:y0 + h, x0:x0 + w][mask]
        visible = np.bincount(owner[owner >= 0], minlength=len(areas))
        lost = np.bincount(covered[covered >= 0], minlength=len(areas))
        if ((visible - lost) >= _MIN_VISIBLE * np.asarray(areas)).all():
            return box
    return None


def _draw_image(rng: np.random.Generator,
                size: int) -> Tuple[np.ndarray, List[Tuple[list, int]]]:
    """Draw one image; return it (BGR uint8) and its ``(xywh, label)``."""
    img = _background(rng, size)
    _draw_distractors(rng, img)

    # Index of the object seen at each pixel, -1 for the background.
    owner = np.full((size, size), -1, np.int64)
    objects, areas = [], []
    boxes = np.zeros((0, 4))
    num_objects = int(rng.integers(1, _MAX_OBJECTS + 1))
    for w, h in _sample_sizes(rng, size, num_objects):
        label = int(rng.integers(0, len(SYNTHETIC_CLASSES)))
        mask = _shape_mask(label, w, h, rng).astype(bool)
        box = _place(rng, owner, areas, boxes, mask)
        if box is None:
            continue
        x0, y0 = int(box[0]), int(box[1])
        region = img[y0:y0 + h, x0:x0 + w]
        color = _contrasting_color(rng, region[mask].mean(axis=0))
        # Shaded, not flat: a vertical brightness ramp across the object.
        shade = np.linspace(-20, 20, h, dtype=np.float32)[:, None, None]
        region[mask] = (color + shade * np.ones((1, w, 1)))[mask]
        owner[y0:y0 + h, x0:x0 + w][mask] = len(objects)

        ys, xs = np.nonzero(mask)
        tight = [
            x0 + int(xs.min()), y0 + int(ys.min()),
            int(xs.max() - xs.min() + 1),
            int(ys.max() - ys.min() + 1)
        ]
        objects.append((tight, label))
        areas.append(int(mask.sum()))
        boxes = np.vstack([boxes, box])

    # Noise on top of everything, objects included.
    img += rng.normal(0, 6, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), objects


def _generate_split(root: str, split: str, num_images: int, image_size: int,
                    seed: int, progress: bool) -> str:
    img_dir = osp.join(root, split)
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    bar = ProgressBar(num_images) if progress and num_images else None
    for k in range(num_images):
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], k])
        img, objects = _draw_image(rng, image_size)
        file_name = f'{k:06d}.png'
        cv2.imwrite(osp.join(img_dir, file_name), img)
        image_id = k + 1
        images.append(
            dict(
                id=image_id,
                file_name=file_name,
                width=image_size,
                height=image_size))
        for (x, y, w, h), label in objects:
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=image_id,
                    category_id=label + 1,
                    bbox=[x, y, w, h],
                    area=w * h,
                    iscrowd=0))
        if bar is not None:
            bar.update()

    categories = [
        dict(id=i + 1, name=name, supercategory='shape')
        for i, name in enumerate(SYNTHETIC_CLASSES)
    ]
    ann_file = osp.join(root, 'annotations', f'instances_{split}.json')
    with open(ann_file, 'w') as f:
        json.dump(
            dict(
                images=images, annotations=annotations, categories=categories),
            f)
    return ann_file


def _paths(root: str) -> Dict[str, str]:
    root = osp.abspath(root)
    return dict(
        data_root=root,
        train_ann=osp.join(root, 'annotations', 'instances_train.json'),
        val_ann=osp.join(root, 'annotations', 'instances_val.json'),
        train_img_dir=osp.join(root, 'train'),
        val_img_dir=osp.join(root, 'val'),
        manifest=osp.join(root, MANIFEST_NAME))


def _read_manifest(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_complete(paths: Dict[str, str], num_train: int, num_val: int) -> bool:
    for split, num in (('train', num_train), ('val', num_val)):
        if not osp.isfile(paths[f'{split}_ann']):
            return False
        img_dir = paths[f'{split}_img_dir']
        if not all(
                osp.isfile(osp.join(img_dir, f'{k:06d}.png'))
                for k in range(num)):
            return False
    return True


def make_synthetic_coco(root: str,
                        num_train: int = 200,
                        num_val: int = 50,
                        image_size: int = 128,
                        seed: int = 0,
                        progress: bool = True) -> dict:
    """Write a synthetic COCO-format detection dataset under ``root``.

    The layout is ``root/annotations/instances_{train,val}.json`` and the
    PNG images in ``root/train/`` and ``root/val/``; read it with
    MMDetection's ``CocoDataset`` and
    ``metainfo=dict(classes=SYNTHETIC_CLASSES)``.

    The parameters are stored in ``root/manifest.json``, written last. A
    later call with the same parameters whose files are all there returns
    at once; any other call draws the dataset again over the old files
    (images beyond the new counts stay on disk, outside the annotations).

    Args:
        root (str): Folder of the dataset, created if missing.
        num_train (int): Training images. Defaults to 200.
        num_val (int): Validation images. Defaults to 50.
        image_size (int): Side of the square images in pixels, at least
            32. Defaults to 128.
        seed (int): Seed of the generator, at least 0. Defaults to 0.
        progress (bool): Show a progress bar while drawing. Defaults to
            True.

    Returns:
        dict: Absolute paths: ``data_root``, ``train_ann``, ``val_ann``,
        ``train_img_dir``, ``val_img_dir`` and ``manifest``.

    Raises:
        TypeError: a count, the size or the seed is not an int.
        ValueError: a count is negative, ``image_size < 32`` or
            ``seed < 0``.
    """
    params = dict(
        generator_version=GENERATOR_VERSION,
        num_train=_check_int('num_train', num_train, 0),
        num_val=_check_int('num_val', num_val, 0),
        image_size=_check_int('image_size', image_size, 32),
        seed=_check_int('seed', seed, 0),
        classes=list(SYNTHETIC_CLASSES))
    paths = _paths(root)

    if (_read_manifest(paths['manifest']) == params
            and _is_complete(paths, num_train, num_val)):
        return paths

    # Removed first so that a run cut short is never taken for complete.
    if osp.exists(paths['manifest']):
        os.remove(paths['manifest'])
    os.makedirs(osp.join(paths['data_root'], 'annotations'), exist_ok=True)
    for split, num in (('train', num_train), ('val', num_val)):
        _generate_split(paths['data_root'], split, num, image_size, seed,
                        progress)
    with open(paths['manifest'], 'w') as f:
        json.dump(params, f, indent=2)
    return paths
