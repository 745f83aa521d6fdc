"""GradLayoutHook: find gradients whose layout will not match DDP's bucket views, and fix them."""
from typing import Dict, List, Tuple

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from torch.nn.parallel import DistributedDataParallel

from ..text import names
from ..wrapper import ReconfigurableDDP


def contiguous_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


def layout_mismatches(shapes: Dict[str, Tuple[int, ...]], now: Dict[str, Tuple[int, ...]],
                      built: Dict[str, Tuple[int, ...]]) -> Tuple[List[str], List[str]]:
    """(real, nominal) parameter names whose strides differ from those the buckets were built with.

    A difference only in size-1 dimensions is nominal: DDP warns ("Grad strides do not match bucket
    view strides") but copies nothing differently.
    """
    real, nominal = [], []
    for name, shape in shapes.items():
        a, b = now[name], built[name]
        if a == b:
            continue
        differs = [d for d, size in enumerate(shape) if a[d] != b[d] and size > 1]
        (real if differs else nominal).append(name)
    return real, nominal


@HOOKS.register_module()
class GradLayoutHook(Hook):
    """Before training, compare each parameter's layout with DDP's bucket views and rebuild them.

    A model converted to ``channels_last`` (or given non-contiguous parameters) after DDP was built
    makes every gradient copy into its bucket strided, and DDP warns "Grad strides do not match
    bucket view strides". With :class:`ReconfigurableDDP` the hook makes non-dense parameters
    contiguous and rebuilds DDP so the buckets follow the current layouts (a collective, same point
    on every rank); with plain DDP it can only say which parameters and how to fix the config.
    """

    priority = 'VERY_HIGH'

    def before_train(self, runner) -> None:
        model = runner.model
        if not isinstance(model, DistributedDataParallel):
            return
        module = model.module
        shapes = {n: tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}
        now = {n: p.stride() for n, p in module.named_parameters() if n in shapes}
        built = (model.bucket_strides if isinstance(model, ReconfigurableDDP)
                 else {n: contiguous_strides(s) for n, s in shapes.items()})
        real, nominal = layout_mismatches(shapes, now, built)
        if not real and not nominal:
            return
        what = (f'{len(real)} parameters with a different memory layout than DDP\'s bucket views '
                f'({names(real, 5, "")}) and {len(nominal)} differing only in size-1 dimensions '
                f'({names(nominal, 5, "")})')
        if not isinstance(model, ReconfigurableDDP):
            runner.logger.warning(f'[mmddp_hooks] {what}: convert the model (e.g. '
                                  'model.to(memory_format=torch.channels_last)) before it is wrapped, '
                                  "or use model_wrapper_cfg=dict(type='ReconfigurableDDP')")
            return
        made_contiguous = []
        for n, p in module.named_parameters():
            if n in shapes and not _dense(p):
                p.data = p.data.contiguous()
                made_contiguous.append(n)
        model.refresh_buckets()
        runner.logger.info(f'[mmddp_hooks] {what}: rebuilt DDP so its buckets follow the current '
                           f'layouts' + (f'; made {len(made_contiguous)} non-dense parameters '
                                         'contiguous' if made_contiguous else ''))


def _dense(p) -> bool:
    """Dense and non-overlapping: DDP then gives the bucket view the parameter's own strides."""
    return p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))
