"""The one place that knows how torch releases differ in what this package uses.

Everything else calls these functions and never checks ``torch.__version__`` itself.
"""
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional

import torch.serialization as serialization


@contextmanager
def safe_globals(entries: List[Any]) -> Iterator[None]:
    """Add ``entries`` (objects, or ``(object, 'full.pickle.name')``) to the weights-only allow-list.

    torch >= 2.5 has ``torch.serialization.safe_globals``; before it, the weights-only unpickler's
    allow-list is the dict that ``_get_allowed_globals`` builds on each call, extended here for the
    duration of the block.
    """
    if hasattr(serialization, 'safe_globals'):
        with serialization.safe_globals(entries):
            yield
        return
    from torch import _weights_only_unpickler as unpickler

    extra = {e[1] if isinstance(e, tuple) else f'{e.__module__}.{e.__qualname__}':
             e[0] if isinstance(e, tuple) else e for e in entries}
    original = unpickler._get_allowed_globals
    unpickler._get_allowed_globals = lambda: {**original(), **extra}
    try:
        yield
    finally:
        unpickler._get_allowed_globals = original


def unsafe_globals_in_checkpoint(f: Any) -> Optional[List[str]]:
    """The globals a checkpoint file names beyond torch's allow-list; None where torch cannot tell."""
    getter = getattr(serialization, 'get_unsafe_globals_in_checkpoint', None)
    if getter is None:
        return None
    try:
        return list(getter(f))
    except Exception:  # not a zip checkpoint (legacy format), unreadable: the caller says less
        return None



def serves_cpu_with_gloo(group: Any) -> bool:
    """Whether ``group`` runs CPU tensors on gloo (so control traffic can use it as it is)."""
    import torch.distributed as dist

    get_config = getattr(dist, 'get_backend_config', None)
    if get_config is not None:
        return 'cpu:gloo' in str(get_config(group))
    return dist.get_backend(group) == 'gloo'

