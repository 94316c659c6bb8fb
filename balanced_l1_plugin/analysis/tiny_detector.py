# Copyright (c) balanced_l1_plugin authors. All rights reserved.
"""A Faster R-CNN small enough to train on a CPU, and images to train it on.

Used to measure the cost of the training hooks and to test them in a real
MMEngine run without any dataset on disk. The architecture is MMDetection's
Faster R-CNN (ResNet + FPN + RPN + StandardRoIHead), only narrow: numbers
measured on it are relative costs, not detection results.
"""
import copy
from typing import Optional

import torch
from mmdet.structures import DetDataSample
from mmengine.config import ConfigDict
from mmengine.structures import InstanceData
from torch.utils.data import Dataset


def tiny_faster_rcnn(loss_bbox: Optional[dict] = None,
                     rpn_loss_bbox: Optional[dict] = None,
                     num_classes: int = 3,
                     width: int = 8) -> ConfigDict:
    """Model config of a narrow Faster R-CNN R-18 FPN.

    Args:
        loss_bbox (dict, optional): Regression loss of the RoI head.
            Defaults to None: the plugin's Balanced L1 Loss with the
            paper's ``alpha=0.5, gamma=1.5, beta=1.0``.
        rpn_loss_bbox (dict, optional): Regression loss of the RPN head.
            Defaults to None: MMDetection's ``L1Loss``.
        num_classes (int): Number of object classes. Defaults to 3.
        width (int): Channels of the first ResNet stage; FPN and heads
            scale with it. Defaults to 8.

    Returns:
        ConfigDict: A ``model`` config for ``MODELS.build`` or ``Runner``
        (MMDetection's detectors read ``train_cfg`` by attribute).
    """
    if loss_bbox is None:
        loss_bbox = dict(
            type='balanced_l1_plugin.BalancedL1Loss',
            alpha=0.5,
            gamma=1.5,
            beta=1.0,
            loss_weight=1.0)
    if rpn_loss_bbox is None:
        rpn_loss_bbox = dict(type='L1Loss', loss_weight=1.0)
    fpn_channels = 2 * width
    return ConfigDict(
        type='FasterRCNN',
        data_preprocessor=dict(
            type='DetDataPreprocessor',
            mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375],
            bgr_to_rgb=False,
            pad_size_divisor=32),
        backbone=dict(
            type='ResNet',
            depth=18,
            base_channels=width,
            num_stages=4,
            out_indices=(0, 1, 2, 3),
            frozen_stages=-1,
            norm_cfg=dict(type='BN', requires_grad=True),
            norm_eval=False,
            style='pytorch',
            init_cfg=None),
        neck=dict(
            type='FPN',
            in_channels=[width, 2 * width, 4 * width, 8 * width],
            out_channels=fpn_channels,
            num_outs=5),
        rpn_head=dict(
            type='RPNHead',
            in_channels=fpn_channels,
            feat_channels=fpn_channels,
            anchor_generator=dict(
                type='AnchorGenerator',
                scales=[4],
                ratios=[0.5, 1.0, 2.0],
                strides=[4, 8, 16, 32, 64]),
            bbox_coder=dict(
                type='DeltaXYWHBBoxCoder',
                target_means=[.0, .0, .0, .0],
                target_stds=[1.0, 1.0, 1.0, 1.0]),
            loss_cls=dict(
                type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
            loss_bbox=copy.deepcopy(rpn_loss_bbox)),
        roi_head=dict(
            type='StandardRoIHead',
            bbox_roi_extractor=dict(
                type='SingleRoIExtractor',
                roi_layer=dict(
                    type='RoIAlign', output_size=7, sampling_ratio=0),
                out_channels=fpn_channels,
                featmap_strides=[4, 8, 16, 32]),
            bbox_head=dict(
                type='Shared2FCBBoxHead',
                in_channels=fpn_channels,
                fc_out_channels=4 * fpn_channels,
                roi_feat_size=7,
                num_classes=num_classes,
                bbox_coder=dict(
                    type='DeltaXYWHBBoxCoder',
                    target_means=[0., 0., 0., 0.],
                    target_stds=[0.1, 0.1, 0.2, 0.2]),
                reg_class_agnostic=False,
                loss_cls=dict(
                    type='CrossEntropyLoss',
                    use_sigmoid=False,
                    loss_weight=1.0),
                loss_bbox=copy.deepcopy(loss_bbox))),
        train_cfg=dict(
            rpn=dict(
                assigner=dict(
                    type='MaxIoUAssigner',
                    pos_iou_thr=0.7,
                    neg_iou_thr=0.3,
                    min_pos_iou=0.3,
                    match_low_quality=True,
                    ignore_iof_thr=-1),
                sampler=dict(
                    type='RandomSampler',
                    num=64,
                    pos_fraction=0.5,
                    neg_pos_ub=-1,
                    add_gt_as_proposals=False),
                allowed_border=-1,
                pos_weight=-1,
                debug=False),
            rpn_proposal=dict(
                nms_pre=200,
                max_per_img=100,
                nms=dict(type='nms', iou_threshold=0.7),
                min_bbox_size=0),
            rcnn=dict(
                assigner=dict(
                    type='MaxIoUAssigner',
                    pos_iou_thr=0.5,
                    neg_iou_thr=0.5,
                    min_pos_iou=0.5,
                    match_low_quality=False,
                    ignore_iof_thr=-1),
                sampler=dict(
                    type='RandomSampler',
                    num=64,
                    pos_fraction=0.25,
                    neg_pos_ub=-1,
                    add_gt_as_proposals=True),
                pos_weight=-1,
                debug=False)),
        test_cfg=dict(
            rpn=dict(
                nms_pre=200,
                max_per_img=100,
                nms=dict(type='nms', iou_threshold=0.7),
                min_bbox_size=0),
            rcnn=dict(
                score_thr=0.05,
                nms=dict(type='nms', iou_threshold=0.5),
                max_per_img=20)))


class RandomDetectionDataset(Dataset):
    """Random images with random boxes, made in memory, seeded.

    Each box is painted a flat colour over the noise so that the boxes are
    at least visible to the network; the data is still meaningless for
    accuracy and only serves to run the training machinery.

    Items are in the form MMDetection's ``PackDetInputs`` produces
    (``inputs`` as a uint8 CHW tensor, ``data_samples`` as a
    :class:`DetDataSample`), so ``pseudo_collate`` batches them for the
    model's ``DetDataPreprocessor``.

    Args:
        num_images (int): Length of the dataset. Defaults to 8.
        image_size (int): Height and width in pixels. Defaults to 128.
        num_classes (int): Labels are drawn from ``range(num_classes)``.
            Defaults to 3.
        max_boxes (int): Each image has 1 to ``max_boxes`` boxes.
            Defaults to 3.
        seed (int): Seed of the generator. Defaults to 0.

    Raises:
        ValueError: a size or count is below its minimum (``image_size``
            below 32, any other below 1).
    """

    def __init__(self,
                 num_images: int = 8,
                 image_size: int = 128,
                 num_classes: int = 3,
                 max_boxes: int = 3,
                 seed: int = 0) -> None:
        minimum = dict(num_images=1, image_size=32, num_classes=1, max_boxes=1)
        given = dict(
            num_images=num_images,
            image_size=image_size,
            num_classes=num_classes,
            max_boxes=max_boxes)
        for name, value in given.items():
            low = minimum[name]
            if not isinstance(value, int) or value < low:
                raise ValueError(
                    f'{name} must be an int >= {low}, got {value!r}')
        generator = torch.Generator().manual_seed(seed)
        self.items = [
            self._make_item(i, image_size, num_classes, max_boxes, generator)
            for i in range(num_images)
        ]

    @staticmethod
    def _make_item(index: int, size: int, num_classes: int, max_boxes: int,
                   generator: torch.Generator) -> dict:
        image = torch.randint(
            0, 256, (3, size, size), dtype=torch.uint8, generator=generator)
        num_boxes = int(
            torch.randint(1, max_boxes + 1, (), generator=generator))
        wh = torch.randint(
            size // 6, size // 2, (num_boxes, 2), generator=generator)
        x1 = (torch.rand(num_boxes, generator=generator) *
              (size - wh[:, 0])).long()
        y1 = (torch.rand(num_boxes, generator=generator) *
              (size - wh[:, 1])).long()
        bboxes = torch.stack([x1, y1, x1 + wh[:, 0], y1 + wh[:, 1]], 1)
        labels = torch.randint(
            0, num_classes, (num_boxes, ), generator=generator)
        for (bx1, by1, bx2, by2), label in zip(bboxes.tolist(),
                                               labels.tolist()):
            image[:, by1:by2, bx1:bx2] = 60 + 60 * label

        sample = DetDataSample(
            metainfo=dict(
                img_id=index,
                img_path=f'random_{index}.png',
                ori_shape=(size, size),
                img_shape=(size, size),
                scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(
            bboxes=bboxes.float(), labels=labels)
        return dict(inputs=image, data_samples=sample)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]
