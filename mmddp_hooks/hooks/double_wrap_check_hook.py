"""DoubleWrapCheckHook: a model wrapped in DDP twice fails before the first iteration, by name."""
import gc
from typing import List, Tuple

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def nested_wrappers(model: nn.Module) -> List[Tuple[str, str]]:
    """(module name, wrapper type) of every model wrapper *inside* ``model``."""
    return [(name, type(m).__name__) for name, m in model.named_modules()
            if name and (is_model_wrapper(m) or isinstance(m, DistributedDataParallel))]


def other_ddps_over(module: nn.Module, exclude: nn.Module) -> List[str]:
    """Live DDP objects, other than ``exclude``, whose reducers hook parameters of ``module``."""
    params = {id(p) for p in module.parameters()}
    gc.collect()  # wrappers a runner replaced may still be waiting in reference cycles
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, DistributedDataParallel) and obj is not exclude and \
                getattr(obj, 'reducer', None) is not None and \
                any(id(p) in params for p in obj.module.parameters()):
            found.append(type(obj).__name__)
    return found


@HOOKS.register_module()
class DoubleWrapCheckHook(Hook):
    """Raise before training when DDP wraps a model that is (or holds) a DDP already.

    Two wrappers mean two reducers on the same parameters: gradients are all-reduced twice, or DDP
    stops with "marked ready twice". Typical causes: the model was wrapped by hand in
    ``DistributedDataParallel`` and then again by the runner (``model_wrapper_cfg``), or a submodule
    was wrapped inside ``__init__``.
    """

    priority = 'VERY_HIGH'

    def before_train(self, runner) -> None:
        outer = runner.model
        if not is_model_wrapper(outer) and not isinstance(outer, DistributedDataParallel):
            return
        inner = nested_wrappers(outer.module)
        if inner:
            where = ', '.join(f"'{n}' ({t})" for n, t in inner)
            raise RuntimeError(
                f'[mmddp_hooks] {type(outer).__name__} wraps a model that already contains model '
                f'wrappers: {where}. Pass the plain model to the runner and let '
                'model_wrapper_cfg wrap it once (or remove the manual DistributedDataParallel).')
        others = other_ddps_over(outer.module, outer)
        if others:
            raise RuntimeError(
                f'[mmddp_hooks] the parameters of {type(outer.module).__name__} are also driven by '
                f'another live {", ".join(sorted(set(others)))} besides runner.model '
                f'({type(outer).__name__}): the model was wrapped twice. Wrap it once: either by '
                'hand (and pass the wrapped model with model_wrapper_cfg=None) or through '
                'model_wrapper_cfg.')
