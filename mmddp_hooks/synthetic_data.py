"""What stands in for a config's files: a raw dataset and the two loading steps that read it.

:func:`mmddp_hooks.synthetic.use_synthetic` puts these where a config's innermost dataset and its
``LoadImageFromFile``/``LoadAnnotations`` steps were, and keeps everything else: the dataset wrappers
(``MultiImageMixDataset``, ``RepeatDataset``, ...) and every other transform of the pipeline run as
the config declares them, on data in the form the loading steps produce. Registered in MMEngine's root
registries, so any ``default_scope`` builds them.
"""
import copy
import importlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
from mmengine.dataset import BaseDataset
from mmengine.registry import DATASETS, FUNCTIONS, TRANSFORMS
from torch.utils.data import Dataset

SEG, DET, CLS, GENERIC = 'mmseg', 'mmdet', 'mmpretrain', 'generic'
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
        kind = spec['type'] if isinstance(spec['type'], str) else spec['type'].__name__
        if kind.rsplit('.', 1)[-1] == 'LoadPanopticAnnotations':
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


def import_function(name: Union[str, Callable]) -> Callable:
    """``'my_pkg.data.make_batch'`` -> that function (a function is returned as it is)."""
    if callable(name):
        return name
    module, _, attr = name.rpartition('.')
    if not module:
        raise ValueError(f'{name!r}: give the function with its module, e.g. my_pkg.make_batch')
    return getattr(importlib.import_module(module), attr)


@DATASETS.register_module()
class BuiltBatches(Dataset):
    """Whole batches made by the user's ``builder(index, batch_size)``: what the config's own
    train loader would yield (the input of the model's data preprocessor). Loaded with batch size 1
    and :func:`unbatched`, so each item is one batch; ``index`` comes from the loader's sampler,
    different on each rank and iteration."""

    def __init__(self, builder: Union[str, Callable], batch_size: int = 2,
                 length: int = 1024) -> None:
        self.builder, self.batch_size, self.length = builder, batch_size, length
        self._build = import_function(builder)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self._build(index, self.batch_size)


@FUNCTIONS.register_module()
def unbatched(items: Sequence[Any]) -> Any:
    """The one item of a loader batch of size 1 (a whole batch from :class:`BuiltBatches`)."""
    return items[0]


# -------------------------------------------------------------- models the doctor does not know
class SyntheticDataUnsupported(ValueError):
    """The config cannot be fed synthetic data: train it on its own dataset instead."""


FRAMES = 4  # "several frames": a clip's length
N_PROMPTS = 3


def _points(rng: np.random.RandomState, h: int, w: int) -> np.ndarray:
    return np.stack([rng.uniform(0, w, N_PROMPTS), rng.uniform(0, h, N_PROMPTS)], 1).astype(
        np.float32)


def _boxes(rng: np.random.RandomState, h: int, w: int) -> np.ndarray:
    xy = _points(rng, h // 2, w // 2)
    return np.concatenate([xy, xy + np.array([w / 2, h / 2], np.float32)], 1)


def _label_map(seed: int, h: int, w: int, n: int) -> np.ndarray:
    return synthetic_label_map(seed, h, w, n)


# what the later steps of an unknown pipeline may read, and how it is made: (seed, H, W, classes)
KNOWN_KEYS: Dict[str, Callable[[int, int, int, int], Any]] = {
    'img': lambda s, h, w, n: synthetic_image(s, h, w),
    'frames': lambda s, h, w, n: [synthetic_image(s + t, h, w) for t in range(FRAMES)],
    'imgs': lambda s, h, w, n: [synthetic_image(s + t, h, w) for t in range(FRAMES)],
    'frame_inds': lambda s, h, w, n: np.arange(FRAMES),
    'gt_seg_map': lambda s, h, w, n: _label_map(s, h, w, n),
    'gt_panoptic_seg': lambda s, h, w, n: _label_map(s, h, w, n).astype(np.int32),
    'gt_mask': lambda s, h, w, n: (_label_map(s, h, w, 2) > 0).astype(np.uint8),
    'gt_masks': lambda s, h, w, n: np.stack([(_label_map(s + i, h, w, 2) > 0).astype(np.uint8)
                                             for i in range(N_PROMPTS)]),
    'gt_depth_map': lambda s, h, w, n: _rng(s).rand(h, w).astype(np.float32),
    'gt_bboxes': lambda s, h, w, n: _boxes(_rng(s), h, w),
    'gt_boxes': lambda s, h, w, n: _boxes(_rng(s), h, w),
    'prompt_bboxes': lambda s, h, w, n: _boxes(_rng(s), h, w),
    'gt_bboxes_labels': lambda s, h, w, n: _rng(s).randint(0, n, N_PROMPTS),
    'gt_labels': lambda s, h, w, n: _rng(s).randint(0, n, N_PROMPTS),
    'gt_ignore_flags': lambda s, h, w, n: np.zeros(N_PROMPTS, bool),
    'gt_label': lambda s, h, w, n: int(_rng(s).randint(0, n)),
    'points': lambda s, h, w, n: _points(_rng(s), h, w),
    'point_coords': lambda s, h, w, n: _points(_rng(s), h, w),
    'prompt_points': lambda s, h, w, n: _points(_rng(s), h, w),
    'point_labels': lambda s, h, w, n: np.ones(N_PROMPTS, np.int64),
    'text': lambda s, h, w, n: f'a synthetic caption {s % 7}',
    'caption': lambda s, h, w, n: f'a synthetic caption {s % 7}',
    'texts': lambda s, h, w, n: [f'class {i}' for i in range(n)],
}


class _RawLike:
    """Mixed into the config's own dataset class: synthetic raw samples instead of its files,
    with the keys the pipeline was found to read (``keys``), and the user's ``values``."""

    def __init__(self, *args: Any, synthetic: dict, **kwargs: Any) -> None:
        self._synthetic = synthetic
        super().__init__(*args, **kwargs)

    def load_data_list(self) -> List[dict]:
        s = self._synthetic
        h, w = s['img_size']
        out = []
        for i in range(s['num_samples']):
            seed = s['seed'] * 100003 + i
            rng = _rng(seed)
            info = dict(img_path=f'synthetic_{i}.jpg', seg_map_path=f'synthetic_{i}.png',
                        height=h, width=w, img_id=i, seg_fields=[], reduce_zero_label=False,
                        gt_label=int(rng.randint(0, s['num_classes'])),
                        synthetic=dict(seed=seed, num_classes=s['num_classes']))
            info['instances'] = [_instance(rng, h, w, s['num_classes']) for _ in range(
                rng.randint(1, 4))]
            out.append(self._values(info, i))
        return out

    def _values(self, info: dict, index: int) -> dict:
        """``info`` with the user's ``values`` (``data_tag=[...]``: taken in turn)."""
        for key, choices in (self._synthetic.get('values') or {}).items():
            info[key] = choices[index % len(choices)] if isinstance(choices, (list, tuple)) \
                else choices
        return info

    def get_data_info(self, idx: int) -> dict:
        return self._with_keys(super().get_data_info(idx))

    def _with_keys(self, info: dict) -> dict:
        """``info`` with the keys the pipeline was found to read."""
        s = self._synthetic
        h, w = s['img_size']
        for key in s['keys']:
            if key not in info:
                info[key] = KNOWN_KEYS[key](info['synthetic']['seed'], h, w, s['num_classes'])
        if 'img' in info:
            info.setdefault('img_shape', (h, w))
            info.setdefault('ori_shape', (h, w))
        return info


def _instance(rng: np.random.RandomState, h: int, w: int, n: int) -> dict:
    (x1, y1, x2, y2) = _boxes(rng, h, w)[0].round().tolist()
    return dict(bbox=[x1, y1, x2, y2], bbox_label=int(rng.randint(0, n)), ignore_flag=0,
                mask=[[x1, y1, x2, y1, x2, y2, x1, y2]])


@DATASETS.register_module()
def SyntheticRawLike(replaces: dict, num_samples: int = 32, img_size: Sequence[int] = (64, 64),
                     num_classes: Optional[int] = None, keys: Sequence[str] = (),
                     values: Optional[dict] = None, seed: int = 0, task: str = GENERIC,
                     skeleton: Optional[Sequence[int]] = None) -> BaseDataset:
    """The config's own dataset (``replaces``, its class and arguments kept), its
    ``load_data_list`` replaced by ``num_samples`` synthetic raw samples of ``img_size``: an image
    path, 1-3 ``instances``, a ``gt_label``, the user's ``values`` (a key: a value or a list to
    take in turn) and the ``keys`` of :data:`KNOWN_KEYS` that its pipeline reads. A pose or video
    dataset (``task``) gets its own format's samples instead
    (:mod:`~mmddp_hooks.synthetic_pose_video`; ``skeleton``: joints and coordinates)."""
    from .synthetic_pose_video import mixin_for

    spec = dict(replaces)
    cls = spec.pop('type')
    if isinstance(cls, str):
        with DATASETS.switch_scope_and_registry(None) as registry:
            cls = registry.get(cls)
    if not (isinstance(cls, type) and issubclass(cls, BaseDataset)):
        raise SyntheticDataUnsupported(
            f'{getattr(cls, "__name__", cls)} is not an MMEngine BaseDataset: the synthetic data '
            'keeps a dataset class and replaces its load_data_list, which this class does not have')
    keep = type(f'Synthetic{cls.__name__}', (mixin_for(task, cls) or _RawLike, cls), {})
    spec.pop('lazy_init', None)
    return keep(synthetic=dict(num_samples=num_samples, img_size=tuple(img_size), seed=seed,
                               num_classes=int(num_classes or 2), keys=list(keys),
                               values=values or {}, skeleton=skeleton), **spec)


@TRANSFORMS.register_module()
class SyntheticLoad:
    """Stands in for a loading step the doctor does not know: reads nothing; what later steps
    read comes with the sample (:class:`SyntheticRawLike`)."""

    def __init__(self, replaces: Any = None, **_ignored: Any) -> None:
        self.replaces = getattr(replaces, '__name__', replaces)

    def __call__(self, results: dict) -> dict:
        return results

    def __repr__(self) -> str:
        return f'{type(self).__name__}(replaces={self.replaces!r})'
