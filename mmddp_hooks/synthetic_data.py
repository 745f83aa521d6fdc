"""What stands in for a config's files: a raw dataset and the two loading steps that read it.

:func:`mmddp_hooks.synthetic.use_synthetic` puts these where a config's innermost dataset and its
``LoadImageFromFile``/``LoadAnnotations`` steps were, and keeps everything else: the dataset wrappers
(``MultiImageMixDataset``, ``RepeatDataset``, ...) and every other transform of the pipeline run as
the config declares them, on data in the form the loading steps produce. Registered in MMEngine's root
registries, so any ``default_scope`` builds them.
"""
import copy
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from mmengine.dataset import BaseDataset
from mmengine.registry import DATASETS, TRANSFORMS

SEG, DET, CLS = 'mmseg', 'mmdet', 'mmpretrain'
PANOPTIC_KEYS = ('with_bbox', 'with_label', 'with_mask', 'with_seg', 'box_type', 'backend_args')
PANOPTIC_DEFAULTS = dict(type='LoadAnnotations', with_bbox=True, with_label=True, with_mask=True,
                         with_seg=True)  # LoadPanopticAnnotations' own defaults


def _rng(seed: int) -> np.random.RandomState:
    return np.random.RandomState(seed % (2 ** 32))


def synthetic_image(seed: int, height: int, width: int, gray: bool = False) -> np.ndarray:
    """Random uint8 HxWx3 (HxW for ``gray``) image, as ``mmcv.imfrombytes`` returns one."""
    shape = (height, width) if gray else (height, width, 3)
    return _rng(seed).randint(0, 256, shape, dtype=np.uint8)


def synthetic_label_map(seed: int, height: int, width: int, num_classes: int) -> np.ndarray:
    """A uint8 HxW map of square regions (an eighth of the short side, 2 to 16 pixels) with labels in
    ``[0, num_classes)``: region borders for edge maps, many classes in every crop.

    No ignore (255) regions: mmseg 1.2.2's ``CrossEntropyLoss`` with a ``class_weight`` (PIDNet's)
    indexes the weights by every label, the ignore label too, and raises (open-mmlab/mmsegmentation
    #3734, on real Cityscapes labels as well); which parameters DDP sees used does not depend on them.
    """
    rng = _rng(seed + 7919)
    cell = max(2, min(16, min(height, width) // 8))
    cells = rng.randint(0, num_classes, (height // cell + 1, width // cell + 1))
    return np.kron(cells, np.ones((cell, cell), dtype=np.int64))[:height, :width].astype(np.uint8)


def _metainfo(replaces: Optional[str], metainfo: Optional[dict]) -> dict:
    """The replaced dataset's own metainfo (its class's ``METAINFO``, updated by the config's
    ``metainfo``), so classes, palette and what wrappers compare are the real run's."""
    found: dict = {}
    if replaces:
        with DATASETS.switch_scope_and_registry(None) as registry:
            try:
                cls = registry.get(replaces)
            except Exception:  # an unregistered or unimportable class: the config's metainfo only
                cls = None
        found = copy.deepcopy(getattr(cls, 'METAINFO', None) or {})
    found.update(copy.deepcopy(metainfo or {}))
    return found


@DATASETS.register_module()
class SyntheticRawDataset(BaseDataset):
    """``num_samples`` raw samples of a task, in the format its dataset's ``load_data_list`` gives.

    - ``mmseg``: an image and a label map (``seg_map_path``, ``seg_fields``, ``reduce_zero_label``);
    - ``mmdet``: an image with 1-3 ``instances`` (box, label, ignore flag, rectangle polygon), every 4th
      one with none unless ``filter_empty_gt``, as real datasets hold images without annotations;
    - ``mmpretrain``: an image and a ``gt_label``.

    The pixels come later, from :class:`SyntheticLoadImage` and :class:`SyntheticLoadAnnotations`,
    seeded by the sample, so every rank sees the same sample for the same index.

    Args:
        task: ``'mmseg'``, ``'mmdet'`` or ``'mmpretrain'``.
        num_samples: dataset length.
        img_size: (H, W) of every raw image.
        num_classes: labels are drawn from ``[0, num_classes)``, at most the metainfo's classes
            (instance labels from its ``thing_classes`` where it has them).
        replaces: the config's dataset type, whose ``METAINFO`` this dataset takes.
        metainfo: the config's ``metainfo`` override.
        pipeline: the config's pipeline, loading steps replaced.
        reduce_zero_label: kept in each sample, as mmseg's datasets keep it.
        filter_empty_gt: no image without instances (the config's ``filter_cfg``).
        seed: base seed.
    """

    def __init__(self, task: str, num_samples: int = 32, img_size: Sequence[int] = (64, 64),
                 num_classes: Optional[int] = None, replaces: Optional[str] = None,
                 metainfo: Optional[dict] = None, pipeline: Sequence = (),
                 reduce_zero_label: bool = False, filter_empty_gt: bool = False,
                 seed: int = 0) -> None:
        if task not in (SEG, DET, CLS):
            raise ValueError(f'task must be {SEG!r}, {DET!r} or {CLS!r}, got {task!r}')
        if len(img_size) != 2 or min(img_size) < 1:
            raise ValueError(f'img_size must be (H, W) with positive sizes, got {img_size}')
        self.task, self.num_samples, self.seed = task, num_samples, seed
        self.img_size = tuple(int(s) for s in img_size)
        self.reduce_zero_label, self.filter_empty_gt = reduce_zero_label, filter_empty_gt
        info = _metainfo(replaces, metainfo)
        classes = info.get('classes')
        known = [n for n in (num_classes, len(classes) if classes else None) if n]
        self.num_classes = int(min(known, default=1))
        # panoptic datasets: instances are things, the semantic map has things and stuff
        self.num_instance_classes = min(self.num_classes,
                                        len(info.get('thing_classes') or ()) or self.num_classes)
        if not classes:
            info['classes'] = tuple(f'class{i}' for i in range(self.num_classes))
        super().__init__(metainfo=info, pipeline=list(pipeline), serialize_data=False)

    def load_data_list(self) -> List[dict]:
        return [self._raw(i) for i in range(self.num_samples)]

    def _raw(self, index: int) -> Dict[str, Any]:
        h, w = self.img_size
        seed = self.seed * 100003 + index
        info: Dict[str, Any] = dict(img_path=f'synthetic_{index}.jpg', height=h, width=w,
                                    synthetic=dict(seed=seed, num_classes=self.num_classes))
        rng = _rng(seed)
        if self.task == SEG:
            info.update(seg_map_path=f'synthetic_{index}.png', label_map=None, seg_fields=[],
                        reduce_zero_label=self.reduce_zero_label)
        elif self.task == CLS:
            info.update(gt_label=int(rng.randint(0, self.num_classes)))
        else:
            empty = index % 4 == 3 and not self.filter_empty_gt
            info.update(img_id=index, seg_map_path=None,
                        instances=[] if empty else [self._instance(rng) for _ in
                                                    range(rng.randint(1, 4))])
        return info

    def _instance(self, rng: np.random.RandomState) -> Dict[str, Any]:
        """A box at least ``min(8, side)`` and at most half the image a side, its rectangle polygon."""
        h, w = self.img_size
        box = []
        for size in (w, h):
            shortest = min(8, size)
            side = rng.randint(shortest, max(shortest, size // 2) + 1)
            start = rng.randint(0, size - side + 1)
            box.append((start, start + side))
        (x1, x2), (y1, y2) = box
        return dict(bbox=[float(x1), float(y1), float(x2), float(y2)],
                    bbox_label=int(rng.randint(0, self.num_instance_classes)), ignore_flag=0,
                    mask=[[x1, y1, x2, y1, x2, y2, x1, y2]])

    def get_cat_ids(self, idx: int) -> List[int]:
        """The labels of sample ``idx``: what ``ClassBalancedDataset`` samples by."""
        info = self.get_data_info(idx)
        if self.task == DET:
            return [i['bbox_label'] for i in info['instances']]
        return [info['gt_label']] if self.task == CLS else []


@TRANSFORMS.register_module()
class SyntheticLoadImage:
    """Stands in for the config's image loader (``replaces``): the sample's synthetic image, with the
    keys ``LoadImageFromFile`` sets (``img``, ``img_shape``, ``ori_shape``)."""

    def __init__(self, replaces: str = 'LoadImageFromFile', to_float32: bool = False,
                 color_type: str = 'color', **_ignored: Any) -> None:
        self.replaces, self.to_float32 = replaces, to_float32
        self.gray = color_type in ('grayscale', 'gray')

    def __call__(self, results: dict) -> dict:
        img = synthetic_image(results['synthetic']['seed'], results['height'], results['width'],
                              self.gray)
        if self.to_float32:
            img = img.astype(np.float32)
        results.update(img=img, img_shape=img.shape[:2], ori_shape=img.shape[:2])
        return results

    def __repr__(self) -> str:
        return f'{type(self).__name__}(replaces={self.replaces!r})'


@TRANSFORMS.register_module()
class SyntheticLoadAnnotations:
    """Stands in for the config's annotation loader: the config's own ``LoadAnnotations`` (mmseg's,
    mmdet's; for ``LoadPanopticAnnotations`` mmdet's with its options), built from ``replaces``, with
    only its file reads swapped for synthetic maps. Boxes, labels and polygon masks are parsed by
    the loader itself from the raw ``instances``, so their types and options (``box_type``,
    ``poly2mask``) are the real run's.
    """

    def __init__(self, replaces: dict) -> None:
        self.replaces = dict(replaces)
        spec = copy.deepcopy(self.replaces)
        if spec['type'].rsplit('.', 1)[-1] == 'LoadPanopticAnnotations':
            # its __init__ needs panopticapi, for the PNG it reads: mmdet's LoadAnnotations with the
            # same options parses the instances alike, and the semantic map is synthetic anyway
            spec = dict(PANOPTIC_DEFAULTS, **{k: v for k, v in spec.items() if k in PANOPTIC_KEYS})
        self.loader = TRANSFORMS.build(spec)
        self.loader._load_seg_map = self._load_seg_map  # the one step that reads a file

    def _load_seg_map(self, results: dict) -> None:
        s = results['synthetic']
        results['gt_seg_map'] = synthetic_label_map(s['seed'], results['height'], results['width'],
                                                    s['num_classes'])
        if 'seg_fields' in results:  # mmseg's transforms crop/flip what seg_fields names
            results['seg_fields'].append('gt_seg_map')
        if hasattr(self.loader, 'ignore_index'):
            results['ignore_index'] = self.loader.ignore_index

    def __call__(self, results: dict) -> Optional[dict]:
        return self.loader(results)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(replaces={self.replaces!r})'
