"""Synthetic samples for pose (mmpose) and video (mmaction2) configs.

The config's own dataset class is kept (its metainfo, its ``get_data_info``: mmpose adds flip
indices and keypoint weights there, mmaction2 the modality and start index); only the raw samples
are made here, in the form its annotation parser gives them:

- mmpose's COCO-style datasets (body, whole-body, face, hand, animal; top-down and bottom-up):
  instances with a box, ``num_keypoints`` keypoints (the dataset's metainfo) and their visibility,
  organised per instance or per image by the class's own ``data_mode`` code;
- mmaction2's video, raw-frame and audio datasets: a clip of ``TOTAL_FRAMES`` frames and a label; the
  file-reading steps (``DecordInit``/``DecordDecode``, ``OpenCV*``, ``PyAV*``, ``PIMS*``,
  ``RawFrameDecode``, ``LoadAudioFeature``) are replaced, the config's frame sampling runs as declared
  and the decoder's stand-in makes the frames it sampled;
- mmaction2's skeleton datasets: keypoint sequences of the backbone's graph layout.
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from mmengine.registry import TRANSFORMS

from .synthetic_data import _RawLike, _rng, synthetic_image

POSE, ACTION = 'mmpose', 'mmaction'
VIDEO_INITS = ('DecordInit', 'OpenCVInit', 'PyAVInit', 'PIMSInit')
FRAME_DECODERS = ('DecordDecode', 'OpenCVDecode', 'PyAVDecode', 'PIMSDecode', 'RawFrameDecode')
FILE_READERS = VIDEO_INITS + FRAME_DECODERS  # loading steps whose names do not start with Load
TOTAL_FRAMES, FPS = 300, 30.0  # a 10 s clip: what Kinetics' sampling strategies expect
AUDIO_SHAPE = (640, 80)  # mmaction2's LoadAudioFeature's own stand-in for a clip without audio
SKELETON_FRAMES = 80  # NTU-60's clips are about that long
LAYOUT_JOINTS = {'coco': 17, 'openpose': 18, 'nturgb+d': 25}
VIDEO_RAW_WIDTH = 4 / 3  # Kinetics' 340x256 videos


def stand_in(step: dict, name: str, task: str) -> Optional[dict]:
    """The synthetic stand-in of a pose or video loading step, or None (not one of theirs)."""
    if task == POSE and name == 'LoadImage':
        return dict(step, type='SyntheticLoadImage', replaces=name)
    if task != ACTION:
        return None
    if name in VIDEO_INITS:
        return dict(type='SyntheticVideoInit', replaces=name)
    if name in FRAME_DECODERS:
        return dict(type='SyntheticDecodeFrames', replaces=name)
    if name == 'LoadAudioFeature':
        return dict(type='SyntheticLoadAudio', replaces=name)
    if name == 'LoadRGBFromFile':
        return dict(step, type='SyntheticLoadImage', replaces=name)
    return None


def _hw_of(size: Any) -> Optional[Tuple[int, int]]:
    """(H, W) of an OpenMMLab (w, h) size or an int; None for anything else (-1 keeps a ratio)."""
    if isinstance(size, int) and size > 0:
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2 and \
            all(isinstance(s, int) and s > 0 for s in size):
        return int(size[1]), int(size[0])
    return None


def pose_size(steps: Sequence[dict]) -> Optional[Tuple[int, int]]:
    """The (H, W) a pose pipeline warps its images to (``TopdownAffine``'s, the bottom-up
    affine's or resize's ``input_size``)."""
    for t in steps:
        if t.get('type', '').rsplit('.', 1)[-1] in ('TopdownAffine', 'BottomupRandomAffine',
                                                     'BottomupResize'):
            return _hw_of(t.get('input_size'))
    return None


def pose_factor(size: Tuple[int, int], factor: float) -> float:
    """``factor``, snapped so that a pose input of ``size`` (H, W) stays a multiple of 32 a side:
    the stride of the backbones' last stage, which heads that flatten it (RTMPose's) and targets at
    a quarter of the input need in whole pixels. 1 where the shipped size is not such a multiple."""
    unit = math.gcd(*size)
    if unit % 32:
        return 1.0
    return max(1, math.floor(factor * unit / 32)) * 32 / unit


def video_size(steps: Sequence[dict]) -> Optional[Tuple[int, int]]:
    """The (H, W) of a video pipeline's clips: its last fixed-size resize or crop."""
    size = None
    for t in steps:
        name = t.get('type', '').rsplit('.', 1)[-1]
        if name == 'Resize' and not t.get('keep_ratio', False):
            size = _hw_of(t.get('scale')) or size
        elif name in ('CenterCrop', 'RandomCrop', 'ThreeCrop', 'TenCrop'):
            size = _hw_of(t.get('crop_size', t.get('size'))) or size
        elif name == 'MultiScaleCrop':
            size = _hw_of(t.get('input_size')) or size
    return size


def video_raw_size(steps: Sequence[dict], train: Tuple[int, int]) -> Tuple[int, int]:
    """(H, W) of the raw frames: the short side the first resize aims at (``scale=(-1, 256)``:
    Kinetics' 256p videos), at least the train size, 4:3."""
    short = max(train)
    for t in steps:
        scale = t.get('scale')
        if t.get('type', '').rsplit('.', 1)[-1] == 'Resize' and isinstance(scale, (list, tuple)) \
                and -1 in scale:
            short = max(short, max(scale))
            break
    return short, round(short * VIDEO_RAW_WIDTH)


# ------------------------------------------------------------------------------------- pose
def _pose_instance(rng: np.random.RandomState, img_id: int, ann_id: int, h: int, w: int,
                   joints: int, crowd: bool = False) -> Dict[str, Any]:
    """One instance as mmpose's ``parse_data_info`` gives it: a box of a quarter to all of the
    image a side, keypoints in it, about one in five not visible."""
    sides = [rng.randint(max(1, s // 4), s + 1) for s in (w, h)]
    x1, y1 = (rng.randint(0, s - side + 1) for s, side in zip((w, h), sides))
    x2, y2 = x1 + sides[0] - 1, y1 + sides[1] - 1
    points = np.stack([rng.uniform(x1, x2, joints), rng.uniform(y1, y2, joints)], 1)
    visible = (rng.rand(joints) > 0.2).astype(np.float32)
    visible[0] = 1  # at least one keypoint: mmpose drops instances without any
    box = [float(x1), float(y1), float(x2), float(y2)]
    return dict(img_id=img_id, img_path=f'synthetic_{img_id}.jpg', id=ann_id,
                bbox=np.array(box, np.float32).reshape(1, 4),
                bbox_score=np.ones(1, np.float32), num_keypoints=int(visible.sum()),
                keypoints=points.astype(np.float32)[None] * visible[None, :, None],
                keypoints_visible=visible[None],
                area=np.array((x2 - x1) * (y2 - y1), np.float32), iscrowd=int(crowd),
                segmentation=[[box[0], box[1], box[2], box[1], box[2], box[3], box[0], box[3]]],
                category_id=np.array(1))


class _PoseLike(_RawLike):
    """An mmpose COCO-style dataset whose annotations are synthetic: 1-3 people an image, every
    4th image also with a crowd region (what bottom-up heatmap masks leave out)."""

    def _load_annotations(self) -> Tuple[List[dict], List[dict]]:
        s = self._synthetic
        h, w = s['img_size']
        joints = int(self.metainfo['num_keypoints'])
        instances: List[dict] = []
        images = [dict(img_id=i, img_path=f'synthetic_{i}.jpg', height=h, width=w)
                  for i in range(s['num_samples'])]
        for i in range(s['num_samples']):
            rng = _rng(s['seed'] * 100003 + i)
            for crowd in [False] * rng.randint(1, 4) + [True] * (i % 4 == 3):
                instances.append(_pose_instance(rng, i, len(instances), h, w, joints, crowd))
        return instances, images

    def load_data_list(self) -> List[dict]:
        self.bbox_file = None  # detected boxes are for testing; training reads annotations
        return super(_RawLike, self).load_data_list()  # the class's own, on the synthetic ones

    def get_data_info(self, idx: int) -> dict:
        info = super(_RawLike, self).get_data_info(idx)  # the class's: flip indices, weights
        h, w = self._synthetic['img_size']
        info.update(height=h, width=w, synthetic=dict(  # per image (bottom-up groups the rest)
            seed=self._synthetic['seed'] * 100003 + int(info['img_id']),
            num_classes=self._synthetic['num_classes']))
        return self._with_keys(self._values(info, int(info['img_id'])))


# ------------------------------------------------------------------------------------ video
def _skeleton(rng: np.random.RandomState, h: int, w: int, joints: int, dims: int) -> dict:
    """1-2 people's keypoints over ``SKELETON_FRAMES`` frames, as mmaction2's pose pickles hold
    them: (M, T, V, C) coordinates (pixels in 2D, metres in 3D) and, in 2D, (M, T, V) scores."""
    people = rng.randint(1, 3)
    shape = (people, SKELETON_FRAMES, joints)
    if dims == 2:
        points = np.stack([rng.uniform(w / 4, 3 * w / 4, shape), rng.uniform(h / 4, 3 * h / 4, shape)],
                          -1)
    else:
        points = rng.uniform(-1, 1, shape + (dims,))
    out = dict(keypoint=points.astype(np.float32), total_frames=SKELETON_FRAMES, img_shape=(h, w),
               original_shape=(h, w))
    if dims == 2:  # 3D poses (NTU's Kinect joints) come without scores
        out['keypoint_score'] = rng.uniform(0.5, 1, shape).astype(np.float32)
    return out


class _VideoLike(_RawLike):
    """An mmaction2 dataset whose clips are synthetic: a video path, a frame folder, an audio
    path, ``TOTAL_FRAMES`` frames and a label (a list of 1-3 for a multi-label dataset); for a
    skeleton dataset, the keypoints instead of the files."""

    def load_data_list(self) -> List[dict]:
        s = self._synthetic
        h, w = s['img_size']
        skeleton = s.get('skeleton') if 'PoseDataset' in {
            c.__name__ for c in type(self).__mro__} else None
        out = []
        for i in range(s['num_samples']):
            seed = s['seed'] * 100003 + i
            rng = _rng(seed)
            labels = rng.choice(s['num_classes'], min(s['num_classes'], rng.randint(1, 4)),
                                replace=False).tolist()
            info: Dict[str, Any] = dict(
                filename=f'synthetic_{i}.mp4', frame_dir=f'synthetic_{i}', audio_path='',
                total_frames=TOTAL_FRAMES, height=h, width=w, label=labels if getattr(
                    self, 'multi_class', False) else labels[0],
                synthetic=dict(seed=seed, num_classes=s['num_classes']))
            if skeleton:
                info.update(_skeleton(rng, h, w, *skeleton))
            out.append(self._values(info, i))
        return out


def skeleton_shape(model: dict, steps: Sequence[dict]) -> Tuple[int, int]:
    """(joints, coordinates) of a skeleton model's keypoints: its graph's layout (COCO's 17
    otherwise), 3D where the pipeline normalises 3D poses."""
    graph = (model.get('backbone') or {}).get('graph_cfg') or {}
    joints = LAYOUT_JOINTS.get(graph.get('layout'), LAYOUT_JOINTS['coco'])
    dims = 3 if any(t.get('type', '').endswith('PreNormalize3D') for t in steps) else 2
    return joints, dims


def mixin_for(task: str, cls: type) -> Optional[type]:
    """The raw-sample mixin for a pose or video dataset class, or None (another task, or a class
    whose annotation format is not one of these)."""
    names = {c.__name__ for c in cls.__mro__}
    if task == POSE and 'BaseCocoStyleDataset' in names:
        return _PoseLike
    if task == ACTION and 'BaseActionDataset' in names:
        return _VideoLike
    return None


# ------------------------------------------------------------------------------- stand-ins
class _StandIn:
    """A loading step's stand-in: says what it replaces."""

    def __init__(self, replaces: str = '', **_ignored: Any) -> None:
        self.replaces = replaces

    def __repr__(self) -> str:
        return f'{type(self).__name__}(replaces={self.replaces!r})'


@TRANSFORMS.register_module()
class SyntheticVideoInit(_StandIn):
    """Stands in for a video reader's init step: the clip's frame count and rate, no reader."""

    def __call__(self, results: dict) -> dict:
        results.setdefault('total_frames', TOTAL_FRAMES)
        results.update(avg_fps=FPS, video_reader=None)
        return results


@TRANSFORMS.register_module()
class SyntheticDecodeFrames(_StandIn):
    """Stands in for a frame decoder: the frames ``frame_inds`` sampled, each seeded by the clip
    and its index (the same frame twice is the same image); two-channel for optical flow."""

    def __call__(self, results: dict) -> dict:
        inds = np.asarray(results['frame_inds'])
        if inds.ndim != 1:
            inds = np.squeeze(inds)
            results['frame_inds'] = inds
        seed, h, w = results['synthetic']['seed'], results['height'], results['width']
        flow = results.get('modality') == 'Flow'
        imgs = [synthetic_image(seed * 1009 + int(i), h, w) for i in inds]
        if flow:
            imgs = [img[..., :2] for img in imgs]
        results.update(imgs=imgs, original_shape=(h, w), img_shape=(h, w), video_reader=None)
        return results


@TRANSFORMS.register_module()
class SyntheticLoadAudio(_StandIn):
    """Stands in for ``LoadAudioFeature``: a spectrogram of the shape its own stand-in has."""

    def __call__(self, results: dict) -> dict:
        audios = _rng(results['synthetic']['seed']).rand(*AUDIO_SHAPE).astype(np.float32)
        results.update(audios=audios, length=AUDIO_SHAPE[0])
        return results
