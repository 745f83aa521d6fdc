"""Random images with boxes (and instance masks) in mmdet's packed format, so detectors train offline."""
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmdet.structures import DetDataSample
from mmdet.structures.bbox import HorizontalBoxes
from mmdet.structures.mask import BitmapMasks
from mmengine.config import Config
from mmengine.registry import DATASETS
from mmengine.structures import InstanceData

from ..model_from_config import train_only
from ..synthetic import SyntheticDataset, synthetic_dataloader

RESIZES = ('Resize', 'RandomResize', 'RandomChoiceResize', 'FixScaleResize')
DEFAULT_SIZE = (128, 128)
DEFAULT_NUM_CLASSES = 80  # COCO's, for a model whose heads do not say


@DATASETS.register_module()
class SyntheticDetDataset(SyntheticDataset):
    """What ``PackDetInputs`` would give after ``LoadAnnotations``: uint8 CHW images, boxes, labels.

    ``gt_instances`` holds 1-3 ``HorizontalBoxes`` inside the image (at least ``min(8, H, W)`` pixels a
    side), int64 labels in ``[0, num_classes)`` and, with ``with_mask``, ``BitmapMasks`` filling the
    boxes; every 4th image (index 3, 7, ...) has no instance at all, as real datasets have images
    without annotations, which losses and assigners must take. ``ignored_instances`` is empty.
    Deterministic per index (seeded), so every rank sees the same sample for the same index.

    Args:
        num_samples: dataset length.
        img_size: (H, W) of every image.
        num_classes: number of classes of the model's heads.
        with_mask: add instance masks (instance segmentation).
        seed: base seed.
    """

    def __init__(self, num_samples: int = 32, img_size: Sequence[int] = DEFAULT_SIZE,
                 num_classes: int = DEFAULT_NUM_CLASSES, with_mask: bool = False,
                 seed: int = 0) -> None:
        super().__init__(num_samples, img_size, num_classes, seed)
        self.with_mask = with_mask

    def _instances(self, boxes: torch.Tensor, labels: torch.Tensor) -> InstanceData:
        """Instances as ``PackDetInputs`` packs them: boxes wrapped, masks as a ``BitmapMasks``."""
        h, w = self.img_size
        instances = InstanceData(bboxes=HorizontalBoxes(boxes, dtype=torch.float32), labels=labels)
        if self.with_mask:
            masks = np.zeros((len(boxes), h, w), dtype=np.uint8)
            for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
                mask[y1:y2, x1:x2] = 1
            instances.masks = BitmapMasks(masks, h, w)
        return instances

    def __getitem__(self, index: int) -> Dict[str, Any]:
        g = self.generator(index)
        h, w = self.img_size
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        num = 0 if index % 4 == 3 else int(torch.randint(1, 4, (1,), generator=g))
        boxes = torch.zeros((num, 4))
        for i in range(num):
            for axis, size in ((0, w), (1, h)):  # x1 and x2, then y1 and y2
                shortest = min(8, size)
                side = int(torch.randint(shortest, max(shortest, size // 2) + 1, (1,), generator=g))
                start = int(torch.randint(0, size - side + 1, (1,), generator=g))
                boxes[i, axis], boxes[i, axis + 2] = start, start + side
        labels = torch.randint(0, self.num_classes, (num,), generator=g, dtype=torch.int64)
        sample = DetDataSample(gt_instances=self._instances(boxes, labels),
                               ignored_instances=self._instances(boxes[:0], labels[:0]))
        sample.set_metainfo(dict(img_id=index, img_path=f'synthetic_{index}.jpg', ori_shape=(h, w),
                                 img_shape=(h, w), scale_factor=(1.0, 1.0), flip=False,
                                 flip_direction=None))
        return dict(inputs=image, data_samples=sample)


def _dicts(node: Any) -> Iterator[dict]:
    """Every dict in a config tree, depth first: the transforms of nested pipelines and wrappers."""
    if isinstance(node, dict):
        yield node
        node = list(node.values())
    if isinstance(node, (list, tuple)):
        for item in node:
            yield from _dicts(item)


def _hw(scale: Any, keep_ratio: bool) -> Tuple[int, int]:
    """(H, W) of a resize ``scale`` (mmcv's (w, h); with ``keep_ratio`` a long and a short edge)."""
    if isinstance(scale, int):
        return scale, scale
    w, h = scale
    return (min(w, h), max(w, h)) if keep_ratio else (h, w)


def train_image_size(cfg: Config) -> Tuple[int, int]:
    """The (H, W) the config trains on: its train pipeline's first resize (the largest of a random
    choice) capped by a later absolute ``RandomCrop``, else the data preprocessor's fixed-size pad,
    else ``DEFAULT_SIZE``."""
    size = None
    for t in _dicts(cfg.get('train_dataloader') or cfg.get('train_pipeline')):
        scales = t.get('scale') or t.get('scales')
        if size is None and t.get('type') in RESIZES and scales:
            many = not isinstance(scales, int) and not isinstance(scales[0], int)
            sizes = [_hw(s, t.get('keep_ratio', False)) for s in (scales if many else [scales])]
            size = max(sizes, key=lambda hw: hw[0] * hw[1])
        elif size and t.get('type') == 'RandomCrop' and t.get('crop_type', 'absolute') == 'absolute':
            size = min(size[0], t['crop_size'][1]), min(size[1], t['crop_size'][0])  # crop is (w, h)
    if size:
        return size
    preprocessor = cfg.model.get('data_preprocessor') or {}
    for t in _dicts(preprocessor.get('batch_augments')):
        if t.get('type') == 'BatchFixedSizePad':
            return tuple(t['size'])
    return DEFAULT_SIZE


def _num_classes(node: Any) -> List[int]:
    """Every integer ``num_classes`` in a config tree (a cascade's heads are a list)."""
    return [d['num_classes'] for d in _dicts(node) if isinstance(d.get('num_classes'), int)]


def has_masks(cfg: Config) -> bool:
    """Instance segmentation: the model has a mask head, or the train pipeline loads masks."""
    if any(d.get('mask_head') for d in _dicts(cfg.model)):
        return True
    return any(d.get('type') == 'LoadAnnotations' and d.get('with_mask')
               for d in _dicts(cfg.get('train_dataloader') or cfg.get('train_pipeline')))


def use_synthetic_det_data(cfg: Config, img_size: Optional[Sequence[int]] = None,
                           max_iters: Optional[int] = None, num_samples: int = 32) -> None:
    """Rewrite a detection config in place to train on :class:`SyntheticDetDataset`.

    The images take ``img_size`` (default: :func:`train_image_size`), the labels the largest
    ``num_classes`` of the model's heads, masks come iff :func:`has_masks`; validation and testing
    are switched off; ``max_iters`` (if given) makes the loop iteration-based. The model, its data
    preprocessor included (it pads each batch itself), is kept as it is.
    """
    size = tuple(img_size or train_image_size(cfg))
    num_classes = max(_num_classes(cfg.model), default=DEFAULT_NUM_CLASSES)
    dataset = dict(type='SyntheticDetDataset', num_samples=num_samples, img_size=size,
                   num_classes=num_classes, with_mask=has_masks(cfg))
    train_only(cfg, max_iters)
    cfg.train_dataloader = synthetic_dataloader(cfg, dataset)
