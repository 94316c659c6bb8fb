"""Checks of a config that run before the runner is built.

The tools call :func:`check_data_cfg` before they build the runner, so that
a bad dataset or optimizer setting fails in seconds, naming the file and the
problem, instead of at the first evaluation or in the middle of an epoch.
MMDetection's ``CocoDataset`` drops an annotation whose category is not in
``categories`` or whose box is degenerate without a word, and finds a
missing image only when a data loader worker reads it; here these are
errors.
"""
import json
import math
import numbers
import os
import os.path as osp
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from mmengine.config import Config
from mmengine.fileio import exists, get_local_path
from mmengine.logging import print_log

SPLITS = ('train', 'val', 'test')

# Problems of one kind listed in an error message; the rest are counted.
MAX_LISTED = 5

# Keys of the dataset wrappers of MMEngine and MMDetection
# (RepeatDataset, ClassBalancedDataset, MultiImageMixDataset, and
# ConcatDataset) that hold the wrapped dataset configs.
_WRAPPED_KEYS = ('dataset', 'datasets')


def check_data_cfg(cfg: Config,
                   splits: Optional[Sequence[str]] = None) -> None:
    """Fail early, naming the file and the problem, on bad data settings.

    For every data loader of ``splits`` present in ``cfg``, each dataset
    (inside ``RepeatDataset``, ``ConcatDataset`` and the other wrappers too)
    is checked:

    - its annotation file exists and, for ``.json``, is valid JSON;
    - for COCO-format datasets (``CocoDataset`` and the subclasses that
      read the file the same way): the file has ``images``, every image an
      ``id``, a ``file_name`` and a size, and the file exists under
      ``data_prefix['img']``; every annotation points at a listed image and
      a listed category and has a box of four finite numbers with
      non-negative width and height; every class of the dataset's
      ``metainfo`` is a category name of the file.

    The ``ann_file`` of ``val_evaluator`` / ``test_evaluator`` must exist
    too. When ``'train'`` is among ``splits``, :func:`check_optim_cfg`
    runs as well. Files behind a storage backend (``backend_args`` set, or
    a URL) are checked for existence only.

    Reading the files is as slow as MMDetection's own loading of them (a
    few seconds for COCO), so in a distributed job only the process of
    global rank 0 (``RANK``, ``SLURM_PROCID`` or ``OMPI_COMM_WORLD_RANK``)
    reads them; the others check that they exist. When rank 0 fails, the
    launcher stops the other processes.

    Args:
        cfg (Config): A full config, as the tools load it.
        splits (Sequence[str], optional): Which of ``'train'``, ``'val'``
            and ``'test'`` to check. ``tools/test.py`` needs only
            ``('test',)``. Defaults to None, all three.

    Raises:
        FileNotFoundError: an annotation file or an image does not exist.
        ValueError: an annotation file is malformed or inconsistent, or
            the learning rate is not a finite number > 0.
        TypeError: ``splits`` names an unknown split.
    """
    splits = SPLITS if splits is None else tuple(splits)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise TypeError(f'splits must be a subset of {SPLITS}, got {splits}')

    # Parsed files by path, or None where only existence is checked.
    parsed: Optional[Dict[str, Any]] = {} if _is_first_process() else None
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if loader and loader.get('dataset'):
            for where, dataset in _leaf_datasets(
                    loader['dataset'], f'{split}_dataloader.dataset'):
                _check_dataset(dataset, where, parsed)
        if split != 'train':
            _check_evaluator(
                cfg.get(f'{split}_evaluator'), f'{split}_evaluator', parsed)

    if 'train' in splits:
        check_optim_cfg(cfg)


def check_optim_cfg(cfg: Config) -> None:
    """Check the learning rate of every optimizer of ``cfg.optim_wrapper``.

    ``torch.optim`` accepts ``lr=0`` and ``lr=nan`` and fails on a negative
    value only when the runner builds the optimizer; here all three fail
    before anything is built.

    Args:
        cfg (Config): A full training config.

    Raises:
        ValueError: an ``lr`` is not a finite number > 0.
    """
    optim_wrapper = cfg.get('optim_wrapper')
    if not optim_wrapper:
        return
    if 'optimizer' in optim_wrapper:
        wrappers = [('optim_wrapper', optim_wrapper)]
    else:
        # One wrapper per sub-model, as for GANs or multi-optimizer setups.
        wrappers = [(f'optim_wrapper.{name}', value)
                    for name, value in optim_wrapper.items()
                    if isinstance(value, dict) and 'optimizer' in value]
    for where, wrapper in wrappers:
        optimizer = wrapper['optimizer']
        if not isinstance(optimizer, dict) or 'lr' not in optimizer:
            continue
        lr = optimizer['lr']
        if (isinstance(lr, bool) or not isinstance(lr, numbers.Real)
                or not math.isfinite(lr) or lr <= 0):
            raise ValueError(
                f'{where}.optimizer.lr must be a finite number > 0, got '
                f'{lr!r}')


def _is_first_process() -> bool:
    """Whether this is global rank 0, or not a distributed job.

    The tools check the config before the process group exists, so the
    rank comes from the launcher's environment.
    """
    for name in ('RANK', 'SLURM_PROCID', 'OMPI_COMM_WORLD_RANK'):
        if name in os.environ:
            return os.environ[name] == '0'
    return True


def _leaf_datasets(dataset: dict, where: str) -> Iterator[Tuple[str, dict]]:
    """Yield ``(where, cfg)`` of each dataset that is not a wrapper."""
    if not isinstance(dataset, dict):
        return
    wrapped = [key for key in _WRAPPED_KEYS if key in dataset]
    if not wrapped:
        yield where, dataset
        return
    for key in wrapped:
        inner = dataset[key]
        if isinstance(inner, dict):
            yield from _leaf_datasets(inner, f'{where}.{key}')
        elif isinstance(inner, (list, tuple)):
            for i, item in enumerate(inner):
                yield from _leaf_datasets(item, f'{where}.{key}[{i}]')


def _is_remote(path: str, backend_args: Optional[dict]) -> bool:
    return backend_args is not None or '://' in path


def _join(root: Optional[str], path: str) -> str:
    if not root or osp.isabs(path) or '://' in path:
        return path
    return osp.join(root, path)


def _check_dataset(dataset: dict, where: str, parsed: Optional[dict]) -> None:
    ann_file = dataset.get('ann_file')
    if not ann_file:
        return
    data_root = dataset.get('data_root')
    backend_args = dataset.get('backend_args')
    path = _join(data_root, ann_file)
    ann = _load_ann_file(path, backend_args, f'{where}.ann_file', parsed)

    dataset_cls = _dataset_class(dataset.get('type'))
    if ann is None or not _reads_coco_json(dataset_cls):
        return

    prefix = dataset.get('data_prefix') or {}
    if 'img' not in prefix:
        raise ValueError(
            f'{where}.data_prefix must have the key "img" (the folder of '
            f'the images, relative to data_root), got {dict(prefix)!r}')
    img_prefix = _join(data_root, prefix['img'])
    if _is_remote(img_prefix, backend_args):
        print_log(
            f'{where}: images under {img_prefix!r} are behind a storage '
            'backend; their existence is not checked.',
            logger='current')
        img_prefix = None

    metainfo = dataset.get('metainfo') or {}
    classes = metainfo.get('classes')
    if classes is None and dataset_cls is not None:
        classes = getattr(dataset_cls, 'METAINFO', {}).get('classes')
    check_coco_annotations(ann, path, img_prefix, classes, where)


def _check_evaluator(evaluator: Any, where: str,
                     parsed: Optional[dict]) -> None:
    if isinstance(evaluator, (list, tuple)):
        for i, metric in enumerate(evaluator):
            _check_evaluator(metric, f'{where}[{i}]', parsed)
        return
    if not isinstance(evaluator, dict):
        return
    if isinstance(evaluator.get('metrics'), (list, tuple, dict)):
        _check_evaluator(evaluator['metrics'], f'{where}.metrics', parsed)
    ann_file = evaluator.get('ann_file')
    if ann_file:
        _load_ann_file(ann_file, evaluator.get('backend_args'),
                       f'{where}.ann_file', parsed)


def _load_ann_file(path: str, backend_args: Optional[dict], where: str,
                   parsed: Optional[dict]) -> Optional[Any]:
    """Check that ``path`` exists; return its JSON, or None if not JSON.

    Files are read once per check, as a dataset's file is often its
    evaluator's too, and not at all if ``parsed`` is None.
    """
    if parsed is not None and path in parsed:
        return parsed[path]
    if _is_remote(path, backend_args):
        found = exists(path, backend_args=backend_args)
    else:
        found = osp.isfile(path)
    if not found:
        raise FileNotFoundError(
            f'{where}: annotation file {path!r} does not exist')

    if parsed is None:
        return None
    ann = None
    if path.endswith('.json'):
        with get_local_path(path, backend_args=backend_args) as local:
            with open(local, encoding='utf-8') as f:
                try:
                    ann = json.load(f)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(
                        f'{where}: {path!r} is not valid JSON: {e}') from e
    parsed[path] = ann
    return ann


def _dataset_class(dataset_type: Any) -> Optional[type]:
    """The class a dataset ``type`` names, or None if it is not found."""
    if isinstance(dataset_type, type):
        return dataset_type
    if not isinstance(dataset_type, str):
        return None
    from mmdet.registry import DATASETS
    try:
        return DATASETS.get(dataset_type)
    except KeyError:
        return None


def _reads_coco_json(dataset_cls: Optional[type]) -> bool:
    """Whether ``dataset_cls`` reads its file as ``CocoDataset`` does.

    Subclasses that parse the file their own way (LVIS has no
    ``file_name``) get only the existence and JSON checks.
    """
    if dataset_cls is None:
        return False
    from mmdet.datasets import CocoDataset
    return (issubclass(dataset_cls, CocoDataset)
            and dataset_cls.load_data_list is CocoDataset.load_data_list
            and dataset_cls.parse_data_info is CocoDataset.parse_data_info)


def check_coco_annotations(ann: Any,
                           ann_file: str,
                           img_prefix: Optional[str] = None,
                           classes: Optional[Sequence[str]] = None,
                           where: str = 'dataset') -> None:
    """Check a parsed COCO-format annotation file.

    Args:
        ann (Any): The parsed JSON of ``ann_file``.
        ann_file (str): Its path, for the messages.
        img_prefix (str, optional): Folder of the images. Defaults to None,
            which skips the check that each image file exists.
        classes (Sequence[str], optional): Class names the dataset trains
            on; each must be a category name of the file. Defaults to None.
        where (str): Where the dataset is in the config, for the messages.
            Defaults to ``'dataset'``.

    Raises:
        FileNotFoundError: an image file does not exist.
        ValueError: the file is malformed or inconsistent.
    """
    head = f'{where}: annotation file {ann_file!r}'
    if not isinstance(ann, dict) or not isinstance(ann.get('images'), list):
        raise ValueError(
            f'{head} is not in COCO format: expected a JSON object with a '
            f'list "images", got {_describe(ann)}')
    images = ann['images']
    annotations = ann.get('annotations', [])
    categories = ann.get('categories', [])
    for key, value in (('annotations', annotations), ('categories',
                                                      categories)):
        if not isinstance(value, list):
            raise ValueError(
                f'{head}: "{key}" must be a list, got {_describe(value)}')

    cat_names = _check_categories(categories, head)
    if classes is not None:
        names = set(cat_names.values())
        missing = [name for name in classes if name not in names]
        if missing:
            raise ValueError(
                f'{head}: {len(missing)} of the {len(classes)} classes of '
                f'the dataset\'s metainfo are not category names of the '
                f'file: {_first(missing)}; the file has '
                f'{_first(sorted(names, key=str))}. Set '
                'metainfo=dict(classes=...) to names of the file')

    img_files = _check_images(images, head, img_prefix)
    _check_annotations(annotations, head, img_files, set(cat_names))


def _first(names: list) -> str:
    """``names``, cut to :data:`MAX_LISTED` items."""
    shown = ', '.join(repr(name) for name in names[:MAX_LISTED])
    if len(names) > MAX_LISTED:
        shown += f', ... {len(names) - MAX_LISTED} more'
    return f'[{shown}]'


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + '...'
    return f'{type(value).__name__} {text}'


def _raise(problems: List[str], what: str, error: type = ValueError) -> None:
    if not problems:
        return
    lines = problems[:MAX_LISTED]
    if len(problems) > MAX_LISTED:
        lines.append(f'... and {len(problems) - MAX_LISTED} more')
    raise error(f'{what}:\n  ' + '\n  '.join(lines))


def _check_categories(categories: list, head: str) -> Dict[Any, str]:
    """Return ``{id: name}`` of the categories."""
    problems = []
    cat_names = {}
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or 'id' not in cat:
            problems.append(f'categories[{i}] has no "id": {_describe(cat)}')
            continue
        if cat['id'] in cat_names:
            problems.append(f'categories[{i}] repeats id {cat["id"]!r}')
        cat_names[cat['id']] = cat.get('name')
    _raise(problems, f'{head} has malformed categories')
    return cat_names


def _check_images(images: list, head: str,
                  img_prefix: Optional[str]) -> Dict[Any, str]:
    """Return ``{id: file_name}`` of the images."""
    problems, missing = [], []
    img_files: Dict[Any, str] = {}
    for i, img in enumerate(images):
        keys = ('id', 'file_name', 'width', 'height')
        if not isinstance(img, dict) or any(k not in img for k in keys):
            problems.append(f'images[{i}] must have the keys {keys}, got '
                            f'{_describe(img)}')
            continue
        if img['id'] in img_files:
            problems.append(f'images[{i}] repeats id {img["id"]!r}')
            continue
        img_files[img['id']] = img['file_name']
        if img_prefix is not None:
            path = osp.join(img_prefix, img['file_name'])
            if not osp.isfile(path):
                missing.append(
                    f'images[{i}] (id={img["id"]!r}): {path!r} does not '
                    'exist')
    _raise(problems, f'{head} has malformed images')
    _raise(missing, f'{head} lists {len(missing)} image(s) not found',
           FileNotFoundError)
    return img_files


def _check_annotations(annotations: list, head: str, img_files: Dict[Any, str],
                       cat_ids: set) -> None:
    problems = []
    for i, obj in enumerate(annotations):
        if _looks_valid(obj, img_files, cat_ids):
            continue
        if not isinstance(obj, dict):
            problems.append(
                f'annotations[{i}] must be an object, got {_describe(obj)}')
            continue
        name = f'annotations[{i}] (id={obj.get("id")!r})'
        img_id = obj.get('image_id')
        if img_id not in img_files:
            problems.append(
                f'{name}: image_id {img_id!r} is not the id of an image')
            continue
        name = f'{name} of image {img_files[img_id]!r}'
        if obj.get('category_id') not in cat_ids:
            problems.append(
                f'{name}: category_id {obj.get("category_id")!r} is not '
                f'in categories (ids {sorted(cat_ids, key=str)})')
        problem = _bbox_problem(obj.get('bbox'))
        if problem:
            problems.append(f'{name}: {problem}')
    _raise(problems, f'{head} has {len(problems)} bad annotation(s)')


def _looks_valid(obj: Any, img_files: Dict[Any, str], cat_ids: set) -> bool:
    """The common case, fast: COCO train2017 has 860k annotations."""
    try:
        x, y, w, h = obj['bbox']
        # ``v - v == 0`` is False for NaN and +-Inf, and raises TypeError
        # for what is not a number; bools take the slow path.
        return (obj['image_id'] in img_files and obj['category_id'] in cat_ids
                and w >= 0 and h >= 0 and x - x == 0 and y - y == 0
                and w - w == 0 and h - h == 0
                and True not in (type(x) is bool, type(y) is bool, type(w)
                                 is bool, type(h) is bool))
    except (TypeError, KeyError, ValueError):
        return False


def _bbox_problem(bbox: Any) -> Optional[str]:
    """Describe what is wrong with a COCO ``[x, y, w, h]`` box, if any."""
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or any(
            isinstance(v, bool) or not isinstance(v, numbers.Real)
            for v in bbox)):
        return f'bbox must be [x, y, width, height], got {bbox!r}'
    if not all(math.isfinite(v) for v in bbox):
        return f'bbox has a non-finite value: {bbox!r}'
    if bbox[2] < 0 or bbox[3] < 0:
        return (f'bbox {bbox!r} has a negative width or height '
                '(COCO boxes are [x, y, width, height])')
    return None
