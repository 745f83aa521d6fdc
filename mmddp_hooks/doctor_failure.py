"""Why the DDP doctor stopped before a verdict, in one paragraph: the stage, the cause named (the
missing module with the config line that imported it, the missing file with the code that opened
it, ``'cuda'`` on a CPU-only machine, a rank the OOM killer ended, a hook that cannot run in a dry
run), and what to do. Tracebacks are for ``--debug``.

Each rank classifies its own exception (:func:`classify`, with the frames and the config at hand)
and leaves it in the doctor's work folder; the doctor reads those, or, for a rank that died
without a Python error, its exit code and the memory it last reported (:func:`killed`).
"""
import errno
import linecache
import os
import re
import sys
import sysconfig
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from .compat import lazy_configs_supported, mmengine_release

LOADING, MODEL, DATA, RUNNING = ('loading the config', 'building the model', 'building the data',
                                 'running')
# exception lines of a rank's output; what the other ranks say when one died is never the cause
EXCEPTION = re.compile(r'^[\w.]*(Error|Exception|Interrupt|StopIteration)\b')
PEER_LOST = ('Connection closed by peer', 'Connection reset by peer', 'stopped watching')
CUDA_MESSAGES = ('Torch not compiled with CUDA enabled', 'Found no NVIDIA driver',
                 'No CUDA GPUs are available', 'CUDA driver initialization failed',
                 'Attempting to deserialize object on a CUDA device', 'cudaGetDeviceCount',
                 # torch 2.15's CUDA build without a driver, in a rank forked after torch looked
                 'Cannot re-initialize CUDA in forked subprocess')
_NO_MODULE = re.compile(r"No module named '([^']+)'")
_LAZY_LOCATION = re.compile(r' in (\S+), line (\d+)')


def _library_dirs() -> Tuple[str, ...]:
    """Where code that is not the user's lives: the standard library, torch, MMEngine, mmcv,
    NumPy and this package (its examples excepted)."""
    dirs = [sysconfig.get_paths()['stdlib']]
    for name in ('torch', 'mmengine', 'mmcv', 'numpy', 'mmddp_hooks'):
        module = sys.modules.get(name)
        if module is not None and getattr(module, '__file__', None):
            dirs.append(os.path.dirname(module.__file__))
    return tuple(d.rstrip(os.sep) + os.sep for d in dirs)


def _show(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith('..') else rel


def _frames(err: BaseException) -> List[Any]:
    frames, tb = [], err.__traceback__
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    return frames


def _origin(err: BaseException) -> BaseException:
    """The exception at the bottom of a chain of re-raises (``raise X from err``, or inside an
    ``except``), whose frames reach the code that failed."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = err.__cause__ or err.__context__
        if inner is None:
            break
        err = inner
    return err


def where(err: BaseException) -> str:
    """``path:line: code`` of the innermost frame of the user's code (else the innermost one)."""
    library = _library_dirs()
    frames = [tb for e in (err, _origin(err)) for tb in _frames(e)]
    if not frames:
        return 'an unknown place'
    own = [tb for tb in frames if not tb.tb_frame.f_code.co_filename.startswith(library)
           or os.sep + 'mmddp_hooks' + os.sep + 'examples' in tb.tb_frame.f_code.co_filename]
    tb = (own or frames)[-1]
    path = tb.tb_frame.f_code.co_filename
    code = linecache.getline(path, tb.tb_lineno).strip()
    return f'{_show(path)}:{tb.tb_lineno}' + (f': {code}' if code else '')


def _in_data(err: BaseException) -> bool:
    """Whether the failure happened inside a dataset, a transform or the data loader."""
    try:
        from mmcv.transforms import BaseTransform
    except ImportError:
        BaseTransform = ()  # noqa: N806
    from torch.utils.data import Dataset

    for e in (err, _origin(err)):
        for tb in _frames(e):
            owner = tb.tb_frame.f_locals.get('self')
            path = tb.tb_frame.f_code.co_filename
            if isinstance(owner, (Dataset, BaseTransform)) or \
                    os.sep.join(('torch', 'utils', 'data')) in path or \
                    os.sep.join(('mmengine', 'dataset')) in path:
                return True
    return type(err).__name__ in ('SyntheticPipelineError', 'SyntheticDataUnsupported')


def _hook_of(err: BaseException) -> Optional[str]:
    """The MMEngine hook (not this package's) whose method raised, or None."""
    from mmengine.hooks import Hook

    for e in (err, _origin(err)):
        for tb in reversed(_frames(e)):
            owner = tb.tb_frame.f_locals.get('self')
            if isinstance(owner, Hook) and not type(owner).__module__.startswith('mmddp_hooks'):
                return f'{type(owner).__name__}.{tb.tb_frame.f_code.co_name}'
    return None


def _config_key(cfg: Any, filename: str) -> Optional[str]:
    """The config key whose value names ``filename`` (the whole path, or its end)."""
    def walk(node: Any, key: str):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f'{key}.{k}' if key else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                yield from walk(v, f'{key}[{i}]')
        elif isinstance(node, str) and node and (filename == node or filename.endswith(
                os.sep + node.lstrip('./'))):
            yield key
    try:
        return next(walk(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg, ''), None)
    except Exception:  # a config that cannot be walked: no key to name
        return None


def _config_line(path: str, module: str) -> Optional[str]:
    """The line of a config file that imports ``module`` (its first such line)."""
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if re.search(rf'\b{re.escape(module)}\b', line) and 'import' in line:
                    return f'{_show(path)}:{n}: {line.strip()}'
    except OSError:
        pass
    return None


def _missing_module(err: BaseException, stage: str, config: Optional[str]) -> Dict[str, str]:
    text = str(err)
    if "cannot import name 'read_base'" in text and not lazy_configs_supported():
        return dict(kind='mmengine version',
                    cause=f'{config or "the config"} is a new-style config (`with read_base():`), '
                          f'which mmengine reads from 0.8 on; mmengine '
                          f"{'.'.join(map(str, mmengine_release()))} is installed",
                    todo='pip install "mmengine>=0.8,<1.0" (what mmddp_hooks supports), or write '
                         'the config in the old style (_base_ = [...], types named as strings).')
    found = _NO_MODULE.search(text)
    name = getattr(err, 'name', None) or (found.group(1) if found else None) or 'a module'
    lazy = _LAZY_LOCATION.search(text)
    line = None
    if lazy:  # MMEngine's lazy import: "Failed to import X in CONFIG, line N for ..."
        path, n = lazy.group(1).rstrip(','), int(lazy.group(2))
        line = f'{_show(path)}:{n}: {linecache.getline(path, n).strip()}'
    elif stage == LOADING and config:  # custom_imports, or a line of a config run at load
        line = _config_line(config, name.split('.')[0])
    line = line or where(err)
    cause = f"the module '{name}' is not installed or not on the path (imported by {line})"
    if stage == LOADING:
        todo = ('Install it, or start the doctor from your project\'s root: the doctor puts the '
                'current folder on sys.path, as tools/dist_train.sh puts the repository root on '
                'PYTHONPATH; a package elsewhere needs its folder on PYTHONPATH.')
    else:
        todo = (f"Install it (pip install {name.split('.')[0]}), or leave out what needs it "
                '(--cfg-options), or dry-run without it: the synthetic data (no --real-data) or '
                "the config's ddp_doctor = dict(synthetic_batch='my_pkg.make_batch').")
    return dict(kind='missing module', cause=cause, todo=todo)


def _missing_file(err: BaseException, stage: str, cfg: Any,
                  real_data: bool) -> Dict[str, str]:
    filename = str(getattr(err, 'filename', None) or err)
    key = _config_key(cfg, filename) if cfg is not None else None
    cause = (f'the file {filename} does not exist (opened by {where(err)}'
             + (f'; the config key {key} names it' if key else '') + ')')
    if stage == DATA and real_data:
        todo = ("The config's own data is not on this machine: dry-run without --real-data "
                "(synthetic data through the config's pipeline), or with the config's "
                "ddp_doctor = dict(synthetic_batch='my_pkg.make_batch').")
    else:
        todo = ('Put the file there, or point the config at one that exists'
                + (f' (--cfg-options {key}=PATH)' if key else ' (--cfg-options KEY=PATH)')
                + '; which parameters get gradients does not depend on what it holds.')
    return dict(kind='missing file', cause=cause, todo=todo)


def classify(err: BaseException, stage: str, config: Optional[str] = None, cfg: Any = None,
             real_data: bool = False, rank: Optional[int] = None) -> Dict[str, Any]:
    """``{stage, kind, cause, todo, rank}`` for an exception raised while the doctor ran a config;
    ``stage`` is how far the run got (a failure inside the data is ``building the data``)."""
    if _in_data(err):
        stage = DATA
    origin = _origin(err)
    text = f'{err} {origin}'
    if isinstance(err, ImportError) or isinstance(origin, ImportError):
        named = _missing_module(err if isinstance(err, ImportError) else origin, stage, config)
    elif isinstance(origin, FileNotFoundError) or (
            isinstance(origin, OSError) and origin.errno == errno.ENOENT):
        named = _missing_file(origin, stage, cfg, real_data)
    elif any(m in text for m in CUDA_MESSAGES):
        named = dict(kind='cuda', cause=f"'cuda' was asked for on this CPU-only machine, by "
                                        f'{where(err)}',
                     todo="Take the device from the data or the parameters (x.device, "
                          "next(self.parameters()).device) instead of 'cuda', and load "
                          "checkpoints with map_location='cpu'; or run the doctor on a GPU "
                          'machine.')
    elif _hook_of(err) and stage == RUNNING:
        hook = _hook_of(err)
        named = dict(kind='hook', cause=f'the hook {hook} failed in the dry run: '
                                        f'{type(err).__name__}: {_first_line(err)} (at {where(err)})',
                     todo=f"A hook that needs the whole run cannot run in a few iterations: drop "
                          f"{hook.split('.')[0]} for the dry run (--cfg-options custom_hooks=[...] "
                          'without it); it changes no parameter\'s gradient unless it trains.')
    else:
        named = dict(kind='error', cause=f'{type(err).__name__}: {_first_line(err)} '
                                         f'(at {where(err)})',
                     todo='--debug prints every rank\'s traceback.')
    return dict(stage=stage, rank=rank, **named)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or ['(no message)'])[0][:400]


def paragraph(failure: Dict[str, Any]) -> str:
    """The one paragraph the doctor prints for a run that stopped before a verdict."""
    rank = f' on rank {failure["rank"]}' if failure.get('rank') is not None else ''
    return (f"ddp_doctor stopped while {failure['stage']}{rank}, before a verdict: "
            f"{failure['cause']}. {failure['todo']}").rstrip()


def cause_line(error: str) -> str:
    """The first exception line of the ranks' output that is not a lost peer, else the last one."""
    found = [line.strip() for line in error.splitlines() if EXCEPTION.match(line.strip())]
    own = [line for line in found if not any(p in line for p in PEER_LOST)]
    return ((own or found or [error.strip().splitlines()[-1] if error.strip() else 'no output'])
            [0])[:400]


# ------------------------------------------------------------------------------ killed ranks
def watch_memory(path: str, stage: Callable[[], str], interval: float = 0.5) -> Callable[[], None]:
    """Write this process's resident and peak memory (bytes) and its ``stage()`` to ``path`` now
    and every ``interval`` s, so that a rank the kernel kills leaves what it held, and where;
    returns the writer, to call when the stage changes."""
    def write() -> bool:
        try:
            fields = dict(line.split(':', 1) for line in open('/proc/self/status'))
            rss, peak = (int(fields[k].split()[0]) * 1024 for k in ('VmRSS', 'VmHWM'))
            with open(path + '.tmp', 'w') as f:
                f.write(f'{rss} {peak} {stage()}')
            os.replace(path + '.tmp', path)
        except (OSError, KeyError, ValueError):
            return False
        return True

    def loop() -> None:
        while write():
            threading.Event().wait(interval)
    write()
    threading.Thread(target=loop, name='mmddp-doctor-memory', daemon=True).start()
    return write


def _total_memory() -> Optional[int]:
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError):
        return None


def killed(rank: int, exitcode: int, memory_file: str, nproc: int) -> Dict[str, Any]:
    """A rank that ended by a signal (``exitcode`` < 0) or an exit code, without a Python error."""
    held, stage = None, RUNNING
    if os.path.exists(memory_file):
        rss, peak, stage = open(memory_file).read().split(' ', 2)
        held = max(int(rss), int(peak))
    gib = f'{held / 2 ** 30:.1f} GiB' if held else 'an unknown amount of memory'
    total = _total_memory()
    machine = f' of the {total / 2 ** 30:.0f} GiB this machine has, for {nproc} ranks' \
        if total else ''
    if exitcode == -9:
        return dict(stage=stage, rank=rank, kind='killed',
                    cause=f'the rank was killed (signal 9, exit code -9) holding {gib}{machine}: '
                          "most likely the kernel's OOM killer",
                    todo='Use less memory: a smaller per-rank batch (--batch-size, 2 by default), a '
                         'smaller input (--size H W) or fewer ranks (--nproc).')
    return dict(stage=stage, rank=rank, kind='killed',
                cause=f'the rank ended with exit code {exitcode} without a Python error, holding '
                      f'{gib} (a crash in native code?)',
                todo="--debug prints every rank's output.")
