"""The one place that knows how torch releases differ in what this package uses.

Everything else calls these functions and never checks ``torch.__version__`` itself.
"""
import datetime
import pickle
import types
from typing import Any, Callable, List, Optional

import torch
import torch.serialization as serialization

from .version import TORCH_MAX, TORCH_MIN


def torch_release(version: str = torch.__version__) -> tuple:
    """(major, minor) of a torch version string such as '2.1.2+cu121'."""
    major, minor = version.split('+')[0].split('.')[:2]
    return int(major), int(minor)


def check_torch(version: str = torch.__version__) -> None:
    """Refuse a torch release outside the supported range, naming the range."""
    if not TORCH_MIN <= torch_release(version) <= TORCH_MAX:
        lo, hi = '.'.join(map(str, TORCH_MIN)), '.'.join(map(str, TORCH_MAX))
        raise ImportError(f'mmddp_hooks supports torch {lo} to {hi}.x, but torch {version} is '
                          f'installed: install a torch in that range (pip install "torch>={lo},'
                          f'<{TORCH_MAX[0]}.{TORCH_MAX[1] + 1}")')


def never_compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run eagerly, with everything it calls, even when called from code that
    ``torch.compile`` traces (MMEngine's ``compile=True`` compiles the wrapper's ``train_step``):
    dynamo breaks the graph at the call instead of tracing ``fn``'s collectives, hooks and rebuilds.
    ``torch._disable_dynamo`` (torch >= 2.0, what torch's own DDP and optimizers use) imports
    ``torch._dynamo`` at the first call only, so ``import mmddp_hooks`` does not pay for it."""
    return torch._disable_dynamo(fn, recursive=True)


# The first torch release whose dynamo compiles the wrapper's train_step (MMEngine's compile=True)
# through a usage change and freezes (tests/test_contract.py): on 2.1.2 and 2.2.2 tracing it raised
# InternalTorchDynamoError; 2.3.1 compiled it but never retraced the model when its branch woke up
# (modules are not guarded there), so that step trained as the first trace had; 2.4.1 passes.
COMPILE_MIN = (2, 4)


def check_compile(compile_cfg: Any, version: str = torch.__version__) -> None:
    """Refuse a config's ``compile`` (true, or a dict of options) on a torch before
    :data:`COMPILE_MIN`, naming both versions."""
    if compile_cfg and torch_release(version) < COMPILE_MIN:
        raise RuntimeError(
            f'[mmddp_hooks] compile={compile_cfg!r} needs torch >= {COMPILE_MIN[0]}.{COMPILE_MIN[1]} '
            f"with DDPAutoTuneHook, but torch {version} is installed: its dynamo cannot compile the "
            "wrapper's train_step through a usage change (InternalTorchDynamoError before 2.3; a "
            'branch that wakes up is not retraced after). Remove `compile` from the config, or '
            'install a newer torch.')


def detail_segfaults_on_gloo(version: str = torch.__version__) -> bool:
    """TORCH_DISTRIBUTED_DEBUG=DETAIL wraps gloo in a collective-checking layer that segfaults while
    DDP is built, seen on torch 2.13 (not on 2.1)."""
    return torch_release(version) >= (2, 13)


def weights_only_load(load: Callable[..., Any], f: Any, entries: List[Any], *args: Any,
                      **kwargs: Any) -> Any:
    """``load(f, ...)`` that unpickles only torch's tensor types plus ``entries``.

    ``entries``: objects, or ``(object, 'full.pickle.name')``. torch >= 2.5 does this itself
    (``weights_only=True`` inside ``safe_globals``). Older weights-only unpicklers cannot build
    arbitrary classes, so there the file is read with a restricted unpickler instead: the same
    allow-list (torch's own plus ``entries``) decides every global the pickle names, and anything
    else raises ``pickle.UnpicklingError`` before it is imported, let alone called. Unlike torch's
    unpickler it does not re-check the callables it reduces: those can only be allowed globals or
    what they return (the ``entries`` here return data, and ``HistoryBuffer``'s statistics methods).
    """
    kwargs.pop('pickle_module', None)
    if _safe_globals_take_names():
        with serialization.safe_globals(entries):
            return load(f, *args, weights_only=True, **kwargs)
    return load(f, *args, weights_only=False, pickle_module=_restricted_pickle(entries), **kwargs)


def _safe_globals_take_names() -> bool:
    """Whether ``safe_globals`` accepts ``(object, 'full.name')`` entries (not every release that
    has ``safe_globals`` does): probed, not read off the version."""
    if not hasattr(serialization, 'safe_globals'):
        return False
    from torch import _weights_only_unpickler

    try:
        with serialization.safe_globals([(object, 'mmddp_hooks.name_probe')]):
            return 'mmddp_hooks.name_probe' in _weights_only_unpickler._get_user_allowed_globals()
    except (AttributeError, TypeError, ValueError):
        return False


def named_globals(entries: List[Any]) -> dict:
    """``{'full.pickle.name': object}`` for allow-list entries (objects or ``(object, name)``)."""
    return {e[1] if isinstance(e, tuple) else f'{e.__module__}.{e.__qualname__}':
            e[0] if isinstance(e, tuple) else e for e in entries}


def _restricted_pickle(entries: List[Any]) -> Any:
    from torch import _weights_only_unpickler

    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    allowed.update(named_globals(entries))

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            full = f'{"builtins" if module == "__builtin__" else module}.{name}'
            if full not in allowed:
                raise pickle.UnpicklingError(f'Unsupported global: GLOBAL {full} is not allowed')
            return allowed[full]

    def load(file: Any, **kw: Any) -> Any:
        return Unpickler(file, **kw).load()

    return types.SimpleNamespace(Unpickler=Unpickler, load=load, __name__='restricted_pickle')


def unsafe_globals_in_checkpoint(f: Any) -> Optional[List[str]]:
    """The globals a checkpoint file names beyond torch's allow-list; None where torch cannot tell."""
    getter = getattr(serialization, 'get_unsafe_globals_in_checkpoint', None)
    if getter is None:
        return None
    try:
        return list(getter(f))
    except Exception:  # not a zip checkpoint (legacy format), unreadable: the caller says less
        return None


def store_get(store: Any, key: str) -> Optional[bytes]:
    """``key``'s value in a c10d store, or None where it has none, without waiting for it to appear:
    ``Store.check``, then ``get``, where the bindings have ``check`` (torch >= 2.2). torch 2.1's have
    none, so a ``wait`` of 100 ms stands in: one of 1 ms took keys that were there for missing on a
    loaded machine, where the store's answer came later (the watchdog then missed a report or a
    heartbeat). ``compare_set`` would answer in one round trip, but on torch 2.1 it segfaulted a
    rank while another thread ran Python (likely its bytes are built without the GIL; not checked
    against torch's source). A store that is gone raises."""
    if hasattr(store, 'check'):
        return store.get(key) if store.check([key]) else None
    try:
        store.wait([key], datetime.timedelta(milliseconds=100))
    except RuntimeError as e:  # 'Socket Timeout' (TCP), 'Wait timeout' (file, hash)
        if 'timeout' not in str(e).lower():
            raise
        return None
    return store.get(key)


def store_wire_protocol_known(version: str = torch.__version__) -> bool:
    """Whether ``testing.store_proxy`` parses this torch's ``TCPStore`` requests (the query types
    of torch >= 2.2; torch 2.1's clients send others after ``validate``)."""
    return torch_release(version) >= (2, 2)


def set_group_timeout(group: Any, timeout: datetime.timedelta) -> bool:
    """Give ``group``'s collectives another timeout; False where torch has no way to. The public
    ``torch.distributed.set_timeout`` where it exists (2.14 on; there the private
    ``_set_pg_timeout`` warns, on every rank, that it is deprecated), the private one before it
    (after 2.1), nothing on 2.1."""
    import torch.distributed as dist

    setter = getattr(dist, 'set_timeout', None) or getattr(dist.distributed_c10d,
                                                           '_set_pg_timeout', None)
    if setter is None:
        return False
    setter(timeout, group)
    return True


# ------------------------------------------------------------------------------ mmengine releases
def mmengine_release(version: Optional[str] = None) -> tuple:
    """(major, minor, patch) of the installed mmengine (or of ``version``)."""
    import mmengine

    return tuple(int(x) for x in (version or mmengine.__version__).split('+')[0].split('.')[:3])


def lazy_configs_supported() -> bool:
    """Whether mmengine reads new-style (lazy-import) configs, ``with read_base():`` (>= 0.8)."""
    import mmengine.config

    return hasattr(mmengine.config, 'read_base')


def resume_restores_data_position() -> bool:
    """Whether a resumed ``IterBasedTrainLoop`` skips the batches it had trained on (mmengine >=
    0.10.3); before, it starts its data again from the first batch, so no resumed run can match an
    uninterrupted one."""
    return mmengine_release() >= (0, 10, 3)


def paramwise_constructor_skips_frozen() -> bool:
    """Whether ``DefaultOptimWrapperConstructor`` with a ``paramwise_cfg`` leaves out parameters
    that do not require grad (newer mmengine), rather than giving them the base options without
    ``custom_keys`` (older): probed on a two-parameter module, not read off the version."""
    from mmengine.optim import DefaultOptimWrapperConstructor

    module = torch.nn.Linear(1, 1)
    module.bias.requires_grad_(False)
    constructor = DefaultOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1)),
        paramwise_cfg=dict(custom_keys={'weight': dict(lr_mult=1.0)}))
    held = {id(p) for g in constructor(module).optimizer.param_groups for p in g['params']}
    return id(module.bias) not in held
