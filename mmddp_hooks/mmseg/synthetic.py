"""Tiny random images and masks in mmseg's packed format, so configs train offline."""
from typing import Dict, Optional, Sequence

import torch
from mmengine.registry import DATASETS
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample

from ..model_from_config import train_only
from ..synthetic import SyntheticDataset, synthetic_dataloader


@DATASETS.register_module()
class SyntheticSegDataset(SyntheticDataset):
    """What ``PackSegInputs`` would give: uint8 CHW images and ``gt_sem_seg`` masks.

    Deterministic per index (seeded), so every rank sees the same sample for the same index and a
    distributed sampler's partition is what decides who trains on what.

    Args:
        num_samples: dataset length.
        img_size: (H, W) of every image and mask; use the config's ``crop_size``.
        num_classes: labels are drawn from ``[0, num_classes)``.
        seed: base seed.
    """

    METAINFO = dict(classes=None, palette=None)

    def __init__(self, num_samples: int = 32, img_size: Sequence[int] = (64, 64),
                 num_classes: int = 19, seed: int = 0) -> None:
        super().__init__(num_samples, img_size, num_classes, seed)

    def __getitem__(self, index: int) -> Dict:
        g = self.generator(index)
        h, w = self.img_size
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        mask = torch.randint(0, self.num_classes, (1, h, w), generator=g, dtype=torch.long)
        sample = SegDataSample(gt_sem_seg=PixelData(data=mask))
        sample.set_metainfo(dict(img_path=f'synthetic_{index}.png', seg_map_path=None,
                                 ori_shape=(h, w), img_shape=(h, w), pad_shape=(h, w),
                                 scale_factor=(1.0, 1.0), flip=False, flip_direction=None,
                                 reduce_zero_label=False))
        return dict(inputs=image, data_samples=sample)


def use_synthetic_data(cfg, img_size: Optional[Sequence[int]] = None, num_samples: int = 32,
                       max_iters: Optional[int] = None) -> None:
    """Rewrite a segmentation config in place to train on :class:`SyntheticSegDataset`.

    The images take ``img_size`` (default: the config's ``crop_size``), the labels the decode
    head's ``num_classes``; validation and testing are switched off; ``max_iters`` (if given)
    replaces the training loop with an iteration-based one. Everything about the model is kept.
    """
    size = tuple(img_size or cfg.get('crop_size') or
                 cfg.model.get('data_preprocessor', {}).get('size') or (64, 64))
    head = cfg.model.get('decode_head') or {}
    if isinstance(head, list):  # CascadeEncoderDecoder: the last head predicts the classes
        head = head[-1]
    num_classes = head.get('num_classes', 19)
    train_only(cfg, max_iters)
    cfg.train_dataloader = synthetic_dataloader(cfg, dict(
        type='SyntheticSegDataset', num_samples=num_samples, img_size=size, num_classes=num_classes))
    if cfg.model.get('data_preprocessor') is not None:
        cfg.model.data_preprocessor.size = size
