"""The sizes of a config's synthetic data: which task's format fits its model, the size it trains
at, the size of its raw images, and one factor that scales every pixel size of its pipeline
(``--size``)."""
from typing import Any, List, Optional, Sequence, Tuple

from mmengine.config import Config

from .model_from_config import config_dicts, type_name
from .synthetic_data import CLS, DET, GENERIC, SEG
from .synthetic_pose_video import ACTION, POSE, pose_size, video_raw_size, video_size

# keys whose integers are pixel sizes, in transforms and data preprocessors; scaled by --size
SIZE_KEYS = ('scale', 'scales', 'img_scale', 'crop_size', 'size', 'random_size_range', 'border')
RESIZES = ('Resize', 'RandomResize', 'RandomChoiceResize', 'FixScaleResize')
CLS_SIZES = ('RandomResizedCrop', 'CenterCrop', 'RandomCrop', 'ResizeEdge', 'Resize')
CLS_PREPROCESSORS = ('ClsDataPreprocessor', 'SelfSupDataPreprocessor', 'TwoNormDataPreprocessor')
DEFAULT_SIZE = {SEG: (512, 512), DET: (128, 128), CLS: (224, 224), GENERIC: (64, 64),
                POSE: (256, 192), ACTION: (224, 224)}
# a pose model's input, target and head sizes: scaled together (a head's flattened features)
POSE_SIZE_KEYS = ('input_size', 'heatmap_size', 'in_featuremap_size')


def synthetic_task(cfg: Config) -> str:
    """``'mmseg'``, ``'mmdet'``, ``'mmpretrain'``, ``'mmpose'`` or ``'mmaction'``: the raw data format
    that fits the config's model, else ``'generic'`` (a model the doctor does not know: its own
    dataset class is kept, see
    :func:`use_synthetic`).

    Read from the config alone (no import, no model built), so a launcher can check it before it
    starts ranks.
    """
    model = cfg.get('model') or {}
    # mmpretrain's configs keep it at the top level; the Runner puts it into the model
    preprocessor = type_name(model.get('data_preprocessor') or cfg.get('data_preprocessor'))
    scope = cfg.get('default_scope')
    if preprocessor == 'PoseDataPreprocessor' or scope == POSE:
        return POSE
    if preprocessor == 'ActionDataPreprocessor' or scope == ACTION:
        return ACTION
    if preprocessor == 'SegDataPreProcessor' or model.get('decode_head') is not None:
        return SEG
    if preprocessor == 'DetDataPreprocessor' or any(
            model.get(head) is not None for head in ('bbox_head', 'roi_head', 'rpn_head')):
        return DET
    if preprocessor in CLS_PREPROCESSORS or scope == CLS:
        return CLS
    return GENERIC


def _hw(scale: Any, keep_ratio: bool) -> Tuple[int, int]:
    """(H, W) of a resize ``scale`` (mmcv's (w, h); with ``keep_ratio`` a long and a short edge)."""
    if isinstance(scale, int):
        return scale, scale
    w, h = scale
    return (min(w, h), max(w, h)) if keep_ratio else (h, w)


def _first_resize(cfg: Config) -> Optional[Tuple[int, int]]:
    """(H, W) the train pipeline's first resize aims at (the largest of a random choice), or None."""
    for t in config_dicts(cfg.get('train_dataloader')):
        scales = t.get('scale') or t.get('scales')
        if type_name(t) in RESIZES and scales:
            # ``scales`` are choices (ints: short edges); a ``scale`` is one, or a range of two
            many = 'scales' in t or not isinstance(scales[0] if isinstance(scales, (list, tuple))
                                                   else scales, int)
            sizes = [_hw(s, t.get('keep_ratio', False)) for s in (scales if many else [scales])]
            return max(sizes, key=lambda hw: hw[0] * hw[1])
    return None


def _det_size(cfg: Config) -> Optional[Tuple[int, int]]:
    """A detector's first train resize capped by an absolute ``RandomCrop`` (mmdet's crop is
    (w, h)), else the preprocessor's fixed-size pad."""
    size = _first_resize(cfg)
    if size:
        for t in config_dicts(cfg.get('train_dataloader')):
            if type_name(t) == 'RandomCrop' and t.get('crop_type', 'absolute') == 'absolute':
                size = min(size[0], t['crop_size'][1]), min(size[1], t['crop_size'][0])
        return size
    preprocessor = cfg.model.get('data_preprocessor') or {}
    for t in config_dicts(preprocessor.get('batch_augments')):
        if type_name(t) == 'BatchFixedSizePad':
            return tuple(t['size'])
    return None


def _cls_size(cfg: Config) -> Optional[Tuple[int, int]]:
    """A classifier's train crop (mmpretrain's sizes are an int or (h, w))."""
    for t in config_dicts(cfg.get('train_dataloader')):
        value = t.get('crop_size', t.get('scale')) if type_name(t) in CLS_SIZES else None
        if isinstance(value, int):
            return value, value
        if isinstance(value, (list, tuple)) and len(value) == 2 and \
                all(isinstance(v, int) for v in value):
            return tuple(value)
    return None


def raw_size(cfg: Config, task: str) -> Tuple[int, int]:
    """The (H, W) of the raw images: what the train pipeline's first resize aims at (a dataset's
    images are about that size: Cityscapes' 1024x2048 for ``scale=(2048, 1024)``), else the train
    size (a classifier's crops take any image; a pose crop's image is twice its size a side; a
    video's frames are 4:3, their short side what the first resize aims at)."""
    if task == POSE:
        return tuple(2 * s for s in train_size(cfg, task))
    if task == ACTION:
        return video_raw_size(_train_steps(cfg), train_size(cfg, task))
    return (task != CLS and _first_resize(cfg)) or train_size(cfg, task)


def _train_steps(cfg: Config) -> List[dict]:
    return [t for t in config_dicts(cfg.get('train_dataloader')) if isinstance(t.get('type'), str)]


def train_size(cfg: Config, task: str) -> Tuple[int, int]:
    """The (H, W) the config as shipped trains on: a segmentor's ``crop_size`` (its preprocessor
    pads to it), a detector's train resize capped by its crop, a classifier's train crop, a pose
    model's input, a video model's clip size."""
    if task == SEG:
        size = (cfg.model.get('data_preprocessor') or {}).get('size') or cfg.get('crop_size')
    elif task in (POSE, ACTION):
        size = (pose_size if task == POSE else video_size)(_train_steps(cfg))
    else:
        size = _det_size(cfg) if task == DET else _cls_size(cfg)
    return tuple(int(s) for s in size) if size else DEFAULT_SIZE[task]


def _scaled(value: Any, factor: float) -> Any:
    """Every int in ``value`` times ``factor`` (at least 1 in size); floats (ratios) as they are."""
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        return value
    if isinstance(value, int):
        return (1 if value > 0 else -1) * max(1, round(abs(value) * factor)) if value else 0
    return type(value)(_scaled(v, factor) for v in value)


def scale_sizes(node: Any, factor: float, keys: Sequence[str] = SIZE_KEYS) -> None:
    """Scale, in place, the pixel sizes (``keys``) of every transform under ``node``."""
    if factor == 1:
        return
    for d in config_dicts(node):
        for key in keys:
            if key in d and 'type' in d:
                d[key] = _scaled(d[key], factor)
