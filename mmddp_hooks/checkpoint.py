"""Load checkpoints without running code from them: weights-only unpickling, MMEngine's types allowed.

Since torch 2.6, ``torch.load`` refuses anything but tensors and containers unless told otherwise, and
MMEngine 0.10.7 checkpoints also hold its message hub (``HistoryBuffer`` objects with numpy arrays and
scalars). Setting ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` makes them load, but then every checkpoint the
process reads, a downloaded ``load_from`` model included, is unpickled with full code execution.

:func:`safe_checkpoint_loading` is the one place that decides instead: inside it, every ``torch.load``
(MMEngine's resume and ``load_from``, ``init_cfg`` pretrained weights, torch.hub downloads) runs
weights-only, with exactly the types an MMEngine 0.10.7 checkpoint holds added to torch's allow-list.
A file that holds anything else is refused with an error naming the type, before any of it runs. A
file the user trusts is named explicitly and is the only one loaded with full unpickling.
"""
import codecs
import os
import os.path as osp
import pickle
import re
import zipfile
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, List, Optional
from urllib.parse import urlparse

import torch

from . import compat

TRUST_KEY = 'trusted_checkpoints'
TRUST_FLAG = '--trust-checkpoint'


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds a type that MMEngine checkpoints never hold and nobody said to trust it."""


_STATISTICS = ('min', 'max', 'mean', 'current')


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """``getattr`` as a ``HistoryBuffer`` pickle uses it (its four statistics methods), nothing else.

    MMEngine pickles ``HistoryBuffer._statistics_methods``, whose values are the class's ``min``,
    ``max``, ``mean`` and ``current``; the pickle fetches each with ``getattr(HistoryBuffer, name)``.
    A general ``getattr`` would let a file reach any attribute.
    """
    from mmengine.logging import HistoryBuffer

    method = vars(HistoryBuffer).get(name) if obj is HistoryBuffer else None
    if name not in _STATISTICS or not callable(method):
        raise pickle.UnpicklingError(
            f'getattr({getattr(obj, "__qualname__", type(obj).__name__)}, {name!r}) is not part of '
            'an MMEngine checkpoint')
    return method


def mmengine_checkpoint_globals() -> List[Any]:
    """What an MMEngine 0.10.7 checkpoint holds beyond torch's own allow-list.

    Measured with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on checkpoints written by
    the Runner (message hub, optimizer, schedulers, EMA, our plan). numpy's array and scalar
    reconstructors are named under both module paths, so files written under numpy 1 load under
    numpy 2 and back.
    """
    import numpy as np
    from mmengine.logging import HistoryBuffer

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    # a dtype unpickles as an instance of its own class (numpy.dtypes.Float64DType, ...)
    dtype_classes = {type(np.dtype(c)) for c in np.typecodes['All'] if c not in 'Mm'}
    entries: List[Any] = [HistoryBuffer, np.ndarray, np.dtype, *sorted(dtype_classes, key=str),
                          (_history_buffer_getattr, 'builtins.getattr'),
                          (codecs.encode, '_codecs.encode')]  # array bytes in pickle protocol 2
    for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        entries += [(multiarray._reconstruct, f'{mod}._reconstruct'),
                    (multiarray.scalar, f'{mod}.scalar')]
    return entries


def _source(f: Any) -> Optional[str]:
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    return getattr(f, 'name', None) if isinstance(getattr(f, 'name', None), str) else None


def _is_trusted(path: Optional[str], trusted: Iterable[str]) -> bool:
    """``path`` is one of ``trusted``: the same file, or the file torch.hub downloads a URL to."""
    if path is None:
        return False
    real = osp.realpath(osp.expanduser(path))
    for entry in trusted:
        if urlparse(entry).scheme in ('http', 'https'):
            entry = osp.join(torch.hub.get_dir(), 'checkpoints', osp.basename(urlparse(entry).path))
        if osp.realpath(osp.expanduser(entry)) == real:
            return True
    return False


def _torchscript_archive(f: Any) -> bool:
    """A TorchScript zip (it holds ``constants.pkl``): older torch hands it to ``torch.jit.load``,
    which runs its code, before any unpickler allow-list is consulted."""
    position = f.tell() if hasattr(f, 'tell') else None
    try:
        if not zipfile.is_zipfile(f):
            return False
        with zipfile.ZipFile(f) as archive:
            return any(n.endswith('constants.pkl') for n in archive.namelist())
    except (OSError, ValueError):
        return False
    finally:
        if position is not None:
            f.seek(position)


def _refusal(path: Optional[str], f: Any, error: Exception) -> UntrustedCheckpointError:
    if path is None:
        return UntrustedCheckpointError(
            '[mmddp_hooks] refused to load a checkpoint stream that holds more than an MMEngine '
            'checkpoint; only files can be trusted by name: save it to a file and trust that.\n'
            f'torch said: {_torch_reason(str(error))}')
    shown = path
    names = compat.unsafe_globals_in_checkpoint(f)
    if names is not None:
        allowed = compat.named_globals(mmengine_checkpoint_globals())
        names = [n for n in names if n not in allowed]
    else:  # torch cannot list them: the refused one is in the unpickler's message
        names = re.findall(r'GLOBAL ([\w.]+)', str(error))[:1]
    what = (f'it holds {", ".join(names)}, which an MMEngine checkpoint never holds' if names
            else 'it holds objects that weights-only loading refuses')
    return UntrustedCheckpointError(
        f'[mmddp_hooks] refused to load {shown}: {what}, and unpickling them could run code. Nothing '
        'from the file was executed. If you trust this file, allow it alone, either on the command '
        f'line with `{TRUST_FLAG} {shown}` (tools/train.py, tools/ddp_doctor.py) or in the config '
        f"with `{TRUST_KEY} = ['{shown}']`.\ntorch said: {_torch_reason(str(error))}")


def _torch_reason(message: str) -> str:
    """The line of torch's weights-only error that says what it refused (not its boilerplate)."""
    boilerplate = ('Weights only load failed', 'Please file an issue', 'Check the documentation')
    lines = [ln.replace('WeightsUnpickler error:', '').strip() for ln in message.splitlines()]
    return next((ln for ln in lines if ln and not ln.startswith(boilerplate)), message.strip())


@contextmanager
def safe_checkpoint_loading(trusted: Iterable[str] = ()) -> Iterator[None]:
    """Within this block every ``torch.load`` is weights-only with MMEngine's types allowed.

    A ``weights_only=False`` passed by the caller (torch.hub passes it for downloads) is overridden:
    only the files in ``trusted`` (paths, or URLs whose download has that file name) are unpickled
    in full. Other files holding more than MMEngine writes raise :class:`UntrustedCheckpointError`.

    Args:
        trusted: checkpoint paths or URLs the user vouches for, one by one.
    """
    trusted = [str(t) for t in trusted]
    original = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        path = _source(f)
        if _is_trusted(path, trusted):
            kwargs['weights_only'] = False
            return original(f, *args, **kwargs)
        kwargs.pop('weights_only', None)
        if _torchscript_archive(f):
            raise _refusal(path, f, pickle.UnpicklingError(
                'a TorchScript archive (constants.pkl): loading it runs the code it carries'))
        try:
            return compat.weights_only_load(original, f, mmengine_checkpoint_globals(), *args,
                                            **kwargs)
        except pickle.UnpicklingError as e:
            raise _refusal(path, f, e) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def trusted_from(cfg: Any, extra: Iterable[str] = ()) -> List[str]:
    """The files a run trusts: the config's ``trusted_checkpoints`` plus those given on the command line."""
    declared = cfg.get(TRUST_KEY) or []
    if isinstance(declared, str):
        declared = [declared]
    return [str(p) for p in declared] + [str(p) for p in extra]
