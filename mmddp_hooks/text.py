"""Text shared by every message: where the user's code is, and lists cut to a readable length."""
import linecache
import os
import sys
import sysconfig
from typing import Callable, Optional, Sequence, Tuple

INSTALLED = ('site-packages', 'dist-packages')
# code that runs the user's code and is not theirs: NumPy, PyTorch, MMEngine, mmcv and the OpenMMLab
# codebases, wherever they are installed (a source checkout too), and this package
LIBRARIES = ('numpy', 'torch', 'mmengine', 'mmcv', 'mmdet', 'mmseg', 'mmpretrain', 'mmcls', 'mmpose',
             'mmaction', 'mmdet3d', 'mmocr', 'mmrotate', 'mmyolo', 'mmagic', 'mmtrack', 'mmddp_hooks')
AND_MORE = ' and {rest} more'


def library_dirs() -> Tuple[str, ...]:
    """The folders of Python's standard library and of the :data:`LIBRARIES` imported so far."""
    dirs = [sysconfig.get_paths()['stdlib']]
    for name in LIBRARIES:
        module = sys.modules.get(name)
        if module is not None and getattr(module, '__file__', None):
            dirs.append(os.path.dirname(module.__file__))
    return tuple(d.rstrip(os.sep) + os.sep for d in dirs)


def is_library(path: str) -> bool:
    """Whether ``path`` is not the user's code: Python's own (``<frozen ...>``, the standard
    library), an installed package's, or a library's of :data:`LIBRARIES` wherever it lives."""
    return path.startswith('<') or any(f'{d}{os.sep}' in path for d in INSTALLED) or \
        os.path.abspath(path).startswith(library_dirs())


def innermost_user(paths: Sequence[str],
                   library: Callable[[str], bool] = is_library) -> Optional[int]:
    """The index in ``paths`` (outermost frame first) of the innermost one that is not
    ``library``'s: the user's line that led to what happened. None when every frame is library code."""
    return next((i for i in range(len(paths) - 1, -1, -1) if not library(paths[i])), None)


def shown(path: str) -> str:
    """``path`` relative to the current folder where it is inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith('..') else rel


def code_line(path: str, lineno: int) -> str:
    """``path:line: code``, the path as :func:`shown` gives it."""
    code = linecache.getline(path, lineno).strip()
    return f'{shown(path)}:{lineno}' + (f': {code}' if code else '')


def names(items: Sequence[str], n: int, more: str = ' ...', sep: str = ', ') -> str:
    """The first ``n`` of ``items`` joined by ``sep``, then ``more`` where some are left out
    (``{rest}`` in it: how many; ``''``: nothing)."""
    return sep.join(items[:n]) + (more.format(rest=len(items) - n) if len(items) > n else '')
