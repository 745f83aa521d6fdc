"""Why the DDP doctor stopped before a verdict, in one paragraph: the stage (from the frames of the
failure: data, model, visualizer and loggers, optimizer, hooks, the steps), the cause named (the
missing module, found behind the library's own ImportError, with the line that imported it; a type
not in the registry, with its ``class`` in the repository and the ``custom_imports`` to add; the
missing file with the code that opened it; ``'cuda'`` on a CPU-only machine; a rank the OOM killer
ended; a hook that cannot run in a dry run), and what to do, where it applies. Tracebacks are for
``--debug``.

Each rank classifies its own exception (:func:`classify`, with the frames and the config at hand)
and leaves it in the doctor's work folder; the doctor reads those (:func:`first_failure`: each
distinct error with its ranks; a rank that only lost a peer is a consequence, said last), or, for
a rank that died without a Python error, its exit code and the memory it last reported
(:func:`mmddp_hooks.rank_memory.killed`).
"""
import errno
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from .compat import lazy_configs_supported, mmengine_release
from .registry_hint import not_registered
from .text import code_line, innermost_user

LOADING, MODEL, DATA, RUNNING = ('loading the config', 'building the model', 'building the data',
                                 'running')
STARTING = 'starting the ranks'  # before the doctor's code ran on a rank: its process group
VISUALIZER, OPTIMIZER, HOOKS = ('setting up the visualizer and loggers', 'building the optimizer',
                                'running the hooks before training')
# the Runner's methods, by the stage they are (a failure's innermost one names its stage)
_RUNNER_STAGES = {
    'build_logger': VISUALIZER, 'build_message_hub': VISUALIZER, 'build_visualizer': VISUALIZER,
    'build_log_processor': VISUALIZER, 'build_model': MODEL, 'wrap_model': MODEL,
    '_init_model_weights': MODEL, 'load_or_resume': MODEL, 'build_dataloader': DATA,
    'build_optim_wrapper': OPTIMIZER, 'build_param_scheduler': OPTIMIZER, 'scale_lr': OPTIMIZER,
    'run_iter': RUNNING}
_BEFORE_TRAINING = ('before_run', 'before_train', 'after_load_checkpoint', 'before_train_epoch')
LOST_PEER = 'lost peer'  # the kind of what a rank says when another one died: never the cause
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


def _chain(err: BaseException) -> List[BaseException]:
    """The exception and every one behind it (``__cause__``, ``__context__``), outermost first."""
    found: List[BaseException] = []
    todo = [err]
    while todo:
        e = todo.pop(0)
        if e is not None and all(e is not f for f in found):
            found.append(e)
            todo += [e.__cause__, e.__context__]
    return found


def where(err: BaseException) -> str:
    """``path:line: code`` of the innermost frame of the user's code (else the innermost one)."""
    frames = [tb for e in (err, _origin(err)) for tb in _frames(e)]
    if not frames:
        return 'an unknown place'
    user = innermost_user([tb.tb_frame.f_code.co_filename for tb in frames])
    tb = frames[-1 if user is None else user]
    return code_line(tb.tb_frame.f_code.co_filename, tb.tb_lineno)


def _stage_of(err: BaseException, stage: str) -> str:
    """The stage the failure happened in, from its innermost frame that tells: a dataset, a
    transform or the data loader; a visualizer, its backends or a logger; a hook before training;
    the Runner method on the stack (model, optimizer, ...). ``stage`` (how far the run got) if
    none does."""
    try:
        from mmcv.transforms import BaseTransform
    except ImportError:
        BaseTransform = ()  # noqa: N806
    from mmengine.hooks import Hook
    from mmengine.runner import Runner
    from mmengine.visualization import BaseVisBackend, Visualizer
    from torch.utils.data import Dataset

    if any(type(e).__name__ in ('SyntheticPipelineError', 'SyntheticDataUnsupported')
           for e in _chain(err)):
        return DATA
    for tb in (tb for e in reversed(_chain(err)) for tb in reversed(_frames(e))):
        owner, name = tb.tb_frame.f_locals.get('self'), tb.tb_frame.f_code.co_name
        path = tb.tb_frame.f_code.co_filename
        if isinstance(owner, (Dataset, BaseTransform)) or os.sep.join(('torch', 'utils', 'data')) \
                in path or os.sep.join(('mmengine', 'dataset')) in path:
            return DATA
        if isinstance(owner, (Visualizer, BaseVisBackend)) or \
                type(owner).__module__.startswith('mmengine.logging'):
            return VISUALIZER
        if isinstance(owner, Hook) and not type(owner).__module__.startswith('mmddp_hooks'):
            return HOOKS if name in _BEFORE_TRAINING else RUNNING
        if isinstance(owner, Runner) and name in _RUNNER_STAGES:
            return _RUNNER_STAGES[name]
    return stage


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
                    return code_line(path, n)
    except OSError:
        pass
    return None


def _type_key(cfg: Any, names: List[str]) -> Optional[Tuple[str, str]]:
    """The config key whose ``type`` is the first of ``names`` that the config builds, and that
    name."""
    def walk(node: Any, key: str):
        if isinstance(node, dict):
            kind = node.get('type')
            yield key, getattr(kind, '__name__', kind)
            for k, v in node.items():
                yield from walk(v, f'{key}.{k}' if key else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                yield from walk(v, f'{key}[{i}]')
    try:
        built: Dict[str, str] = {}
        for key, kind in walk(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg, ''):
            if isinstance(kind, str):
                built.setdefault(kind, key)
    except Exception:  # a config that cannot be walked: no key to name
        return None
    return next(((built[n], n) for n in names if n in built), None)


def _owners(err: BaseException) -> List[str]:
    """The classes whose methods are on the failure's stack, innermost first."""
    names = []
    for e in reversed(_chain(err)):
        for tb in reversed(_frames(e)):
            owner = tb.tb_frame.f_locals.get('self')
            if owner is not None and type(owner).__name__ not in names:
                names.append(type(owner).__name__)
    return names


def _module_name(err: BaseException) -> Optional[str]:
    """The module that is missing, from the exception or one behind it: MMEngine and torch wrap a
    ``ModuleNotFoundError`` in an ``ImportError`` of their own words."""
    for e in _chain(err):
        found = _NO_MODULE.search(str(e))
        name = getattr(e, 'name', None) if isinstance(e, ImportError) else None
        if name or found:
            return name or found.group(1)
    return None


def _missing_module(err: BaseException, stage: str, config: Optional[str], cfg: Any,
                    real_data: bool) -> Dict[str, str]:
    if "cannot import name 'read_base'" in str(err) and not lazy_configs_supported():
        return dict(kind='mmengine version',
                    cause=f'{config or "the config"} is a new-style config (`with read_base():`), '
                          f'which mmengine reads from 0.8 on; mmengine '
                          f"{'.'.join(map(str, mmengine_release()))} is installed",
                    todo='pip install "mmengine>=0.8,<1.0" (what mmddp_hooks supports), or write '
                         'the config in the old style (_base_ = [...], types named as strings).')
    name = _module_name(err)
    lazy = _LAZY_LOCATION.search(str(err))
    line = None
    if lazy:  # MMEngine's lazy import: "Failed to import X in CONFIG, line N for ..."
        path, n = lazy.group(1).rstrip(','), int(lazy.group(2))
        line = code_line(path, n)
    elif stage == LOADING and config and name:  # custom_imports, or a config line run at load
        line = _config_line(config, name.split('.')[0])
    line = line or where(err)
    if name is None:  # an ImportError that names no module: its own words
        cause = f'an import failed: {_first_line(err)} (at {line})'
    else:
        cause = f"the module '{name}' is not installed or not on the path (imported by {line})"
    if stage == LOADING:
        todo = ('Install it, or start the doctor from your project\'s root: the doctor puts the '
                'current folder on sys.path, as tools/dist_train.sh puts the repository root on '
                'PYTHONPATH; a package elsewhere needs its folder on PYTHONPATH.')
        return dict(kind='missing module', cause=cause, todo=todo)
    install = f"Install it (pip install {name.split('.')[0]})" if name else 'Install what it needs'
    built = _type_key(cfg, _owners(err)) if cfg is not None else None
    todo = f'{install}, or leave out what needs it (--cfg-options).'
    if built:
        key, kind = built
        cause += f'; the config key {key} builds {kind}, which needs it'
        if key.endswith(']') and stage in (VISUALIZER, HOOKS):  # a backend, a logger, a hook
            todo = (f"{install}, or leave {kind} out of the dry run (--cfg-options "
                    f"{key.rsplit('[', 1)[0]}=[]; it changes no parameter's gradient).")
    if stage == DATA and real_data:
        todo += (' Or dry-run without the data that needs it: the synthetic data (no --real-data) '
                 "or the config's ddp_doctor = dict(synthetic_batch='my_pkg.make_batch').")
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


def _lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is what a rank sees when another one died: a consequence, never the cause."""
    from .watchdog import peer_connection_broke

    return any(type(e).__name__ == 'PeerLost' or peer_connection_broke(e) for e in _chain(err))


def classify(err: BaseException, stage: str, config: Optional[str] = None, cfg: Any = None,
             real_data: bool = False, rank: Optional[int] = None) -> Dict[str, Any]:
    """``{stage, kind, cause, todo, rank}`` for an exception raised while the doctor ran a config;
    ``stage`` is how far the run got, which the failure's own frames refine (an error in the
    model's ``init_weights`` is ``building the model``, whenever it runs)."""
    if stage != LOADING:
        stage = _stage_of(err, stage)
    origin = _origin(err)
    text = f'{err} {origin}'
    if _lost_peer(err):
        named = dict(kind=LOST_PEER, cause=_first_line(err).replace(
            '[mmddp_hooks] HangWatchdogHook: ', ''), todo='')
    elif any(isinstance(e, ImportError) for e in _chain(err)):
        named = _missing_module(err, stage, config, cfg, real_data)
    elif (registry := not_registered([str(e) for e in _chain(err)], config)) is not None:
        named = registry
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
    elif _hook_of(err) and stage in (RUNNING, HOOKS):
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


def first_failure(found: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Of the ranks' classified failures, the cause: the lowest rank's own error (a lost peer is
    never one), with each other distinct error (``others``, with its ranks) and the ranks that then
    lost a peer (``consequences``). None when every rank only lost a peer."""
    own = sorted((f for f in found if f['kind'] != LOST_PEER), key=lambda f: f['rank'] or 0)
    if not own:
        return None
    distinct: List[Dict[str, Any]] = []
    for f in own:
        same = next((d for d in distinct if (d['stage'], d['cause']) == (f['stage'], f['cause'])),
                    None)
        if same is None:
            distinct.append(dict(f, ranks=[f['rank']]))
        else:
            same['ranks'].append(f['rank'])
    return dict(distinct[0], others=distinct[1:],
                consequences=sorted(f['rank'] for f in found if f['kind'] == LOST_PEER))


def _ranks(ranks: List[Any]) -> str:
    return ('rank ' if len(ranks) == 1 else 'ranks ') + ', '.join(map(str, ranks))


def paragraph(failure: Dict[str, Any]) -> str:
    """The one paragraph the doctor prints for a run that stopped before a verdict: the first
    error, then each other rank's different one, then the ranks that only lost a peer."""
    ranks = failure.get('ranks') or ([failure['rank']] if failure.get('rank') is not None else [])
    text = (f"ddp_doctor stopped while {failure['stage']}{' on ' + _ranks(ranks) if ranks else ''}"
            f", before a verdict: {failure['cause']}. {failure['todo']}").rstrip()
    for other in failure.get('others', []):
        todo = '' if other['todo'] == failure['todo'] else f" {other['todo']}"
        text += (f" {_ranks(other['ranks']).capitalize()} stopped on a different error, while "
                 f"{other['stage']}: {other['cause']}.{todo}")
    lost, stopped = failure.get('consequences') or [], failure.get('stopped') or []
    after = []
    if lost:
        after.append(f'{_ranks(lost)} then lost {"its peer" if len(lost) == 1 else "peers"}')
    if stopped:
        after.append(f'{_ranks(stopped)} {"was" if len(stopped) == 1 else "were"} then stopped by '
                     'the doctor')
    if after:
        text += f" {' and '.join(after).capitalize()} (a consequence of the error above, not a cause)."
    return text


def cause_line(error: str) -> str:
    """The first exception line of the ranks' output that is not a lost peer, else the last one."""
    found = [line.strip() for line in error.splitlines() if EXCEPTION.match(line.strip())]
    own = [line for line in found if not any(p in line for p in PEER_LOST)]
    return ((own or found or [error.strip().splitlines()[-1] if error.strip() else 'no output'])
            [0])[:400]
