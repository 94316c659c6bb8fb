"""Write the synthetic COCO-format detection dataset used by the demo.

Example::

    python tools/make_synthetic_dataset.py --root data/synthetic
"""
import argparse
import os.path as osp
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from balanced_l1_plugin.datasets.synthetic import (  # noqa: E402
    SYNTHETIC_CLASSES, make_synthetic_coco)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Generate the synthetic detection dataset (COCO '
        'format); files made earlier with the same parameters are reused.')
    parser.add_argument(
        '--root',
        default='data/synthetic',
        help='output folder (default: data/synthetic)')
    parser.add_argument(
        '--num-train', type=int, default=200, help='training images')
    parser.add_argument(
        '--num-val', type=int, default=50, help='validation images')
    parser.add_argument(
        '--image-size', type=int, default=128, help='image side in pixels')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    paths = make_synthetic_coco(
        args.root,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.image_size,
        seed=args.seed)
    print(f'\nclasses: {", ".join(SYNTHETIC_CLASSES)}')
    for key in ('data_root', 'train_ann', 'val_ann'):
        print(f'{key}: {paths[key]}')


if __name__ == '__main__':
    main()
