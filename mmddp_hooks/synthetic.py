"""Synthetic training data for a config, whatever its task: the one place that picks the generator.

``tools/train.py --synthetic`` and the DDP doctor dry-run configs without their datasets. Which random
samples a model can train on depends on its task (segmentation masks, or boxes and instance masks),
so :func:`use_synthetic` reads the task from the config and hands it to that task's generator; a config
of any other task raises :class:`SyntheticDataUnsupported` before anything is built.
"""
from typing import Any, Dict, Optional, Sequence

import torch
from mmengine.config import Config
from torch.utils.data import Dataset

SEG, DET = 'mmseg', 'mmdet'


class SyntheticDataUnsupported(ValueError):
    """No synthetic data generator fits the config's task: train it on its own dataset instead."""


def _type_name(cfg: Optional[dict]) -> Optional[str]:
    """A config dict's ``type`` without its scope: ``mmdet.DetDataPreprocessor`` is a detector's too."""
    kind = (cfg or {}).get('type')
    return kind.rsplit('.', 1)[-1] if isinstance(kind, str) else kind


def synthetic_task(cfg: Config) -> str:
    """``'mmseg'`` or ``'mmdet'``: the generator that fits the config's model.

    Read from the config alone (no import, no model built), so a launcher can check it before it
    starts ranks. Raises :class:`SyntheticDataUnsupported` for any other model.
    """
    model = cfg.get('model') or {}
    preprocessor = _type_name(model.get('data_preprocessor'))
    if preprocessor == 'SegDataPreProcessor' or model.get('decode_head') is not None:
        return SEG
    if preprocessor == 'DetDataPreprocessor' or any(
            model.get(head) is not None for head in ('bbox_head', 'roi_head', 'rpn_head')):
        return DET
    raise SyntheticDataUnsupported(
        f'no synthetic data for this config: model type {_type_name(model)!r} with data '
        f'preprocessor {preprocessor!r} is neither an mmseg segmentor (decode_head, '
        'SegDataPreProcessor) nor an mmdet detector (bbox_head/roi_head/rpn_head, '
        "DetDataPreprocessor). Use the config's own dataset: run the DDP doctor with --real-data, "
        'or tools/train.py without --synthetic.')


def use_synthetic(cfg: Config, img_size: Optional[Sequence[int]] = None,
                  max_iters: Optional[int] = None) -> None:
    """Rewrite ``cfg`` in place to train on the synthetic data of its task, validation and test off.

    ``img_size`` (H, W) overrides the size the generator reads from the config; ``max_iters`` makes
    the loop iteration-based. Raises :class:`SyntheticDataUnsupported` for a task without a generator.
    """
    if synthetic_task(cfg) == SEG:
        from .mmseg import use_synthetic_data
        use_synthetic_data(cfg, img_size=img_size, max_iters=max_iters)
    else:
        from .mmdet import use_synthetic_det_data
        use_synthetic_det_data(cfg, img_size=img_size, max_iters=max_iters)


def synthetic_dataloader(cfg: Config, dataset: Dict[str, Any]) -> Dict[str, Any]:
    """A single-process train dataloader over ``dataset``, batch size kept from the config's own.

    Call it after the loop is set (``train_only``): an iteration-based loop draws from an infinite
    sampler, while an epoch-based one needs epochs to end, so it gets the default (finite) sampler.
    """
    old = cfg.get('train_dataloader') or {}
    by_epoch = 'max_epochs' in (cfg.get('train_cfg') or {})
    return dict(batch_size=old.get('batch_size', 2), num_workers=0, persistent_workers=False,
                sampler=dict(type='DefaultSampler' if by_epoch else 'InfiniteSampler', shuffle=True),
                collate_fn=dict(type='pseudo_collate'), dataset=dataset)


class SyntheticDataset(Dataset):
    """``num_samples`` random samples of ``img_size`` (H, W) with labels in ``[0, num_classes)``.

    Deterministic per index (seeded), so every rank sees the same sample for the same index and a
    distributed sampler's partition is what decides who trains on what.
    """

    def __init__(self, num_samples: int, img_size: Sequence[int], num_classes: int,
                 seed: int = 0) -> None:
        if len(img_size) != 2 or min(img_size) < 1:
            raise ValueError(f'img_size must be (H, W) with positive sizes, got {img_size}')
        if num_classes < 1:
            raise ValueError(f'num_classes must be >= 1, got {num_classes}')
        self.num_samples = num_samples
        self.img_size = tuple(int(s) for s in img_size)
        self.num_classes = num_classes
        self.seed = seed
        self.metainfo = dict(classes=tuple(f'class{i}' for i in range(num_classes)))

    def __len__(self) -> int:
        return self.num_samples

    def generator(self, index: int) -> torch.Generator:
        """The random source of sample ``index``."""
        return torch.Generator().manual_seed(self.seed * 100003 + index)
