"""Checks of a config's datasets that run before any training step."""
import json
import os.path as osp

from mmengine.config import Config


def check_data_cfg(cfg: Config) -> None:
    """Fail early, naming the file and the problem, on bad annotation data.

    Args:
        cfg (Config): A full training/testing config.

    Raises:
        FileNotFoundError: an annotation file does not exist.
        ValueError: an annotation file is not valid JSON.
    """
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg.get(key)
        if not loader:
            continue
        dataset = loader.get('dataset', {})
        ann_file = dataset.get('ann_file')
        if not ann_file:
            continue
        path = osp.join(dataset.get('data_root') or '', ann_file)
        if not osp.isfile(path):
            raise FileNotFoundError(
                f'{key}.dataset.ann_file: annotation file {path!r} does not '
                'exist')
        with open(path) as f:
            try:
                json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f'{key}.dataset.ann_file: {path!r} is not valid JSON: '
                    f'{e}') from e
