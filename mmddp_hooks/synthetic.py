"""Synthetic training data for a config, fed through the config's own train pipeline.

``tools/train.py --synthetic`` and the DDP doctor dry-run configs without their files. Only what reads
files is replaced: the innermost dataset (by :class:`~mmddp_hooks.synthetic_data.SyntheticRawDataset`,
raw samples in its task's format, the replaced dataset's metainfo) and the loading steps
(``LoadImageFromFile``, ``LoadAnnotations``). The dataset wrappers (``MultiImageMixDataset``,
``RepeatDataset``, ``ConcatDataset``, ``ClassBalancedDataset``), every other transform (``GenerateEdge``,
``Mosaic``, ``PackSegInputs``, custom ones) and the hooks that talk to the dataset run as the config
declares them. A step that cannot run on synthetic data raises an error that names it.
"""
import contextlib
import copy
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from mmengine.config import Config

from .model_from_config import (
    config_dicts,
    innermost_datasets,
    rewrite_nested_configs,
    train_only,
    type_name,
)
from .synthetic_data import GENERIC, KNOWN_KEYS, SyntheticDataUnsupported
from .synthetic_pose_video import ACTION, FILE_READERS, POSE, pose_factor, skeleton_shape, stand_in
from .synthetic_sizes import (
    POSE_SIZE_KEYS,
    SIZE_KEYS,
    raw_size,
    scale_sizes,
    synthetic_task,
    train_size,
)

IMAGE_LOADERS = ('LoadImageFromFile', 'LoadImageFromNDArray')
ANNOTATION_LOADERS = ('LoadAnnotations', 'LoadPanopticAnnotations')
KEEP_CLASS = (GENERIC, POSE, ACTION)  # tasks whose dataset class is kept, its samples made
DISCOVERY_SAMPLES = 8  # samples run through an unknown pipeline to find the keys it reads
__all__ = ['SyntheticDataUnsupported', 'use_synthetic', 'use_batch_builder', 'describe']


def _loader(step: dict, where: str, task: str) -> dict:
    """The synthetic stand-in of one loading step. An unknown loader of a known task is named,
    with the way out; of an unknown model's, it reads nothing (the sample brings what later
    steps read)."""
    name = type_name(step)
    pose_or_video = stand_in(step, name, task)
    if pose_or_video:
        return pose_or_video
    if name in IMAGE_LOADERS:
        return dict(step, type='SyntheticLoadImage', replaces=name)
    if name in ANNOTATION_LOADERS:
        return dict(type='SyntheticLoadAnnotations', replaces=dict(step))
    if task in KEEP_CLASS:
        return dict(type='SyntheticLoad', replaces=name)
    raise SyntheticDataUnsupported(
        f'{where} is {step["type"]!r}, a loading step the synthetic data cannot stand in for (it '
        "reads files the synthetic samples do not have). Run the DDP doctor with --real-data to use "
        "the config's own data, or replace the step with --cfg-options.")


def replace_loaders(node: Any, where: str, replaced: List[str], task: str = GENERIC) -> Any:
    """``node`` with every loading step (a transform whose type starts with ``Load``, and the
    video readers and decoders) replaced; ``replaced`` collects their types."""
    if isinstance(node, dict):
        name = type_name(node)
        if isinstance(name, str) and (name.startswith('Load') or name in FILE_READERS):
            replaced.append(name)
            return _loader(node, where, task)
        return type(node)({k: replace_loaders(v, f'{where}.{k}', replaced, task)
                           for k, v in node.items()})
    if isinstance(node, (list, tuple)):
        return type(node)(replace_loaders(v, f'{where}[{i}]', replaced, task)
                          for i, v in enumerate(node))
    return node


def _num_classes(node: Any) -> List[int]:
    """Every integer ``num_classes`` in a config tree (a cascade's heads are a list)."""
    return [d['num_classes'] for d in config_dicts(node) if isinstance(d.get('num_classes'), int)]


def use_synthetic(cfg: Config, img_size: Optional[Sequence[int]] = None,
                  max_iters: Optional[int] = None, num_samples: int = 32) -> Dict[str, Any]:
    """Rewrite ``cfg`` in place to train on synthetic data through its own train pipeline.

    The innermost datasets become :class:`~mmddp_hooks.synthetic_data.SyntheticRawDataset` of the
    config's task, with raw images of the size the pipeline's first resize aims at, labels below
    the heads' ``num_classes``, the replaced dataset's metainfo and its pipeline (loading steps
    replaced); wrappers, transforms and hooks stay. ``img_size`` (H, W) scales every pixel size of
    the train pipeline, the data preprocessor and the hooks' pipelines by one factor, so the train
    size fits in it (the aspect ratio is the config's). Validation and testing are switched off;
    ``max_iters`` makes the loop iteration-based. Returns what was done: ``task``, ``train_size``,
    ``raw_size``, ``factor``, ``datasets`` (where,
    replaced type) and ``steps`` (the loading steps replaced). Raises
    :class:`SyntheticDataUnsupported` for a task without a format or a loader without a stand-in.
    """
    task = synthetic_task(cfg)
    shipped = train_size(cfg, task)
    factor = 1.0
    if img_size:
        if len(img_size) != 2 or min(img_size) < 1:
            raise ValueError(f'img_size must be (H, W) with positive sizes, got {img_size}')
        factor = min(img_size[0] / shipped[0], img_size[1] / shipped[1])
        if task == POSE:
            factor = pose_factor(shipped, factor)
    size = tuple(max(1, round(s * factor)) for s in shipped)
    raw = tuple(max(1, round(s * factor)) for s in raw_size(cfg, task))
    loader = cfg.get('train_dataloader')
    if not isinstance(loader, dict) or not isinstance(loader.get('dataset'), dict):
        raise SyntheticDataUnsupported('the config has no train_dataloader.dataset to stand in for')
    train_only(cfg, max_iters)
    labels = max(_num_classes(cfg.model), default=None)
    datasets, steps = [], []
    keep = task in KEEP_CLASS
    for dataset, where in list(innermost_datasets(loader['dataset'], 'train_dataloader.dataset')):
        if type_name(dataset) in ('SyntheticRawDataset', 'SyntheticRawLike'):
            continue  # one dict in two wrappers (a config variable used twice): replaced already
        if keep:  # its own class, pipeline and arguments; only its samples are synthetic
            new = dict(type='SyntheticRawLike', replaces=dict(dataset), num_samples=num_samples,
                       img_size=raw, num_classes=labels, task=task,
                       values=dict((cfg.get('ddp_doctor') or {}).get('synthetic_values') or {}))
            if task == ACTION:
                new['skeleton'] = skeleton_shape(cfg.model, list(config_dicts(
                    dataset.get('pipeline'))))
        else:
            new = dict(type='SyntheticRawDataset', task=task, num_samples=num_samples,
                       img_size=raw, num_classes=labels, replaces=dataset.get('type'),
                       metainfo=dataset.get('metainfo'),
                       pipeline=list(dataset.get('pipeline') or []),
                       reduce_zero_label=bool(dataset.get('reduce_zero_label', False)),
                       filter_empty_gt=bool((dataset.get('filter_cfg') or {}).get(
                           'filter_empty_gt')))
        datasets.append((where, type_name(dataset)))
        dataset.clear()
        dataset.update(new)
    loader['dataset'] = replace_loaders(loader['dataset'], 'train_dataloader.dataset', steps,
                                        task)
    if cfg.get('custom_hooks'):  # e.g. RTMDet's PipelineSwitchHook carries a second pipeline
        cfg.custom_hooks = replace_loaders(cfg.custom_hooks, 'custom_hooks', steps, task)
    for node in (loader['dataset'], cfg.get('custom_hooks'), cfg.model.get('data_preprocessor'),
                 cfg.get('data_preprocessor')):
        scale_sizes(node, factor, SIZE_KEYS + POSE_SIZE_KEYS * (task in (POSE, ACTION)))
    if task == POSE:  # the heads' sizes, also in the config files a distiller builds from
        scale_sizes(cfg.model, factor, POSE_SIZE_KEYS)
        rewrite_nested_configs(cfg, lambda sub: scale_sizes(sub.model, factor, POSE_SIZE_KEYS))
    loader.update(num_workers=0, persistent_workers=False)
    sampler = loader.get('sampler') or {}
    if max_iters is not None and type_name(sampler) == 'DefaultSampler':
        # an iteration-based loop restarts a finite sampler, with MMEngine's 2 s pause each time
        loader['sampler'] = dict(sampler, type='InfiniteSampler')
    keys = _discover_keys(cfg) if keep else []
    return dict(task=task, shipped_size=shipped, train_size=size, raw_size=raw, factor=factor,
                datasets=datasets, steps=steps, keys=keys)


def _synthetic_parts(dataset: Any) -> Iterator[Any]:
    """The :class:`~mmddp_hooks.synthetic_data.SyntheticRawLike` datasets under wrappers."""
    from .synthetic_data import _RawLike

    if isinstance(dataset, _RawLike):
        yield dataset
    for inner in [getattr(dataset, 'dataset', None)] + list(getattr(dataset, 'datasets', None) or []):
        if inner is not None:
            yield from _synthetic_parts(inner)


def _discover_keys(cfg: Config) -> List[str]:
    """Run the first samples through the (unknown) pipeline; each key a step reads that the
    samples lack is made (:data:`~mmddp_hooks.synthetic_data.KNOWN_KEYS`) and the sample run
    again. Written into the config's synthetic datasets; an unknown key is named, with its step."""
    from mmengine.registry import DATASETS, DefaultScope

    keys: List[str] = []
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope') or 'mmengine'):
        dataset = DATASETS.build(copy.deepcopy(cfg.train_dataloader.dataset))
    parts = list(_synthetic_parts(dataset))
    for index in range(min(DISCOVERY_SAMPLES, len(dataset))):
        while True:
            try:
                dataset[index]
                break
            except KeyError as err:
                step, key = _pipeline_step(err.__traceback__), err.args[0] if err.args else None
                if step is None or not isinstance(key, str):
                    raise
                if key not in KNOWN_KEYS or key in keys:
                    raise SyntheticDataUnsupported(_unknown_key(step, key)) from None
                keys.append(key)
                for part in parts:
                    part._synthetic['keys'].append(key)
    for dataset_cfg in config_dicts(cfg.train_dataloader):
        if type_name(dataset_cfg) == 'SyntheticRawLike':
            dataset_cfg['keys'] = list(keys)
    return keys


def _unknown_key(step: str, key: str) -> str:
    return (f'the train pipeline step {step} reads the key {key!r}, which the synthetic samples '
            'do not have and cannot make (they make: ' + ', '.join(KNOWN_KEYS) + '). Give its '
            f"values in the config, ddp_doctor = dict(synthetic_values=dict({key}=[...])) (taken "
            "in turn, sample by sample), or use the config's own data (--real-data --subset K) "
            "or your own batches (ddp_doctor = dict(synthetic_batch='my_pkg.make_batch'))")


def describe(done: Dict[str, Any]) -> str:
    """One line on what :func:`use_synthetic` did, for logs and reports."""
    h, w = done['train_size']
    if done['task'] == GENERIC:
        kept = ', '.join(f'{where} ({kind}, its class and pipeline kept)'
                         for where, kind in done['datasets'])
        return (f"synthetic samples of {done['raw_size'][0]}x{done['raw_size'][1]} in {kept}; "
                f"loading steps replaced: {', '.join(sorted(set(done['steps']))) or 'none'}; keys "
                f"made for the later steps: {', '.join(done['keys']) or 'none'}")
    kept = done['task'] in KEEP_CLASS  # a pose or video dataset: its class makes the samples
    replaced = ', '.join(f"{where} ({kind}{', its class kept' if kept else ''})"
                         for where, kind in done['datasets'])
    steps = ', '.join(sorted(set(done['steps']))) or 'none'
    scale = '' if done['factor'] == 1 else \
        f", pipeline sizes scaled by {done['factor']:.3g} from {done['shipped_size'][0]}x" \
        f"{done['shipped_size'][1]}"
    made = f"; keys made for the later steps: {', '.join(done['keys'])}" if done['keys'] else ''
    return (f"synthetic {done['task']} samples of {done['raw_size'][0]}x{done['raw_size'][1]} "
            f"{'in' if kept else 'stand in for'} {replaced}; train size {h}x{w}{scale}; "
            f"loading steps replaced: {steps}{made}; every other step of the config's pipeline runs")


def _pipeline_step(tb: Any) -> Optional[str]:
    """The innermost data transform in a traceback (an mmcv ``BaseTransform``, the base of every
    OpenMMLab transform and of most users' own, or any callable a ``Compose`` called), or None."""
    from mmengine.dataset import Compose
    try:
        from mmcv.transforms import BaseTransform
    except ImportError:  # no mmcv: MMEngine's Compose still runs plain callables
        BaseTransform = ()
    name, composed = None, False
    while tb is not None:
        owner = tb.tb_frame.f_locals.get('self')
        if isinstance(owner, BaseTransform) or (composed and owner is not None):
            name = type(owner).__name__
        composed = isinstance(owner, Compose) and tb.tb_frame.f_code.co_name == '__call__'
        tb = tb.tb_next
    return name


class SyntheticPipelineError(RuntimeError):
    """A step of the config's train pipeline failed on the synthetic samples."""


@contextlib.contextmanager
def pipeline_errors_named(synthetic: bool = True) -> Iterator[None]:
    """Re-raise a failure inside a data transform as :class:`SyntheticPipelineError` naming it
    (and the data it failed on: the synthetic samples, or the config's own)."""
    try:
        yield
    except SyntheticPipelineError:
        raise
    except Exception as err:
        step = _pipeline_step(err.__traceback__)
        if step is None or isinstance(err, (ImportError, OSError)):  # named by their own kind
            raise
        if synthetic:
            way = ("Run the DDP doctor with --real-data --subset K to use the config's own data, "
                   f'or replace or drop {step} with --cfg-options '
                   '(train_dataloader.dataset...pipeline=[...])')
        else:
            way = (f'Fix the data or {step}, or dry-run without --real-data (synthetic data '
                   "through the config's pipeline)")
        data = 'the synthetic data' if synthetic else "the config's own data"
        raise SyntheticPipelineError(f'the train pipeline step {step} failed on {data}: '
                                     f'{type(err).__name__}: {err}. {way}.') from err


def use_batch_builder(cfg: Config, builder: Any, max_iters: Optional[int] = None) -> str:
    """Train on the batches of the config's ``ddp_doctor.synthetic_batch`` function (see
    :class:`~mmddp_hooks.synthetic_data.BuiltBatches`), at the loader's batch size; what was done."""
    loader = cfg.get('train_dataloader')
    if not isinstance(loader, dict):
        raise SyntheticDataUnsupported('ddp_doctor.synthetic_batch: the config has no '
                                       'train_dataloader to replace')
    train_only(cfg, max_iters)
    name = builder if isinstance(builder, str) else f'{builder.__module__}.{builder.__name__}'
    batch_size = loader.get('batch_size', 2)
    cfg.train_dataloader = dict(
        batch_size=1, num_workers=0, persistent_workers=False, collate_fn=dict(type='unbatched'),
        sampler=dict(type='InfiniteSampler', shuffle=True),
        dataset=dict(type='BuiltBatches', builder=builder, batch_size=batch_size))
    return (f"batches of {batch_size} from the config's ddp_doctor.synthetic_batch ({name}), "
            'indices drawn at random on each rank')


def local_usage(cfg: Config, steps: int = 1, backward: bool = True) -> Tuple[Set[str], Set[str]]:
    """Train ``steps`` steps of ``cfg`` (already rewritten by :func:`use_synthetic`) in this process,
    without DDP or a Runner: (trainable parameter names, those that received a gradient).

    An independent account of parameter usage (no probe, no hook). Without ``backward`` only the
    losses are computed, under ``no_grad`` (nothing is used then): the doctor's quick check of
    whether a model runs at a size at all.
    """
    import torch
    from mmengine.dataset import pseudo_collate
    from mmengine.logging import MessageHub
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import DATASETS, FUNCTIONS

    from .model_from_config import build_model

    model = revert_sync_batchnorm(build_model(cfg))
    loader = cfg.train_dataloader
    dataset = DATASETS.build(copy.deepcopy(loader.dataset))
    collate = pseudo_collate
    if loader.get('collate_fn'):
        collate = FUNCTIONS.get(type_name(loader.collate_fn))
    batch_size = loader.get('batch_size', 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    used: Set[str] = set()
    hub = MessageHub.get_current_instance()  # what batch augments (YOLOX's resize) read
    for step in range(steps):
        hub.update_info('iter', step)
        model.zero_grad(set_to_none=True)
        batch = collate([dataset[(step * batch_size + i) % len(dataset)]
                         for i in range(batch_size)])
        with torch.set_grad_enabled(backward):
            data = model.data_preprocessor(batch, training=True)
            loss, _ = model.parse_losses(model(**data, mode='loss'))
        if backward:
            loss.backward()
        used |= {n for n, p in model.named_parameters() if p.grad is not None}
    return trainable, used
