"""What DDP registered when the Runner wrapped the model, against what trains when training starts.

MMEngine's Runner wraps the model in DDP in ``__init__``; ``model.train()`` first runs later (an
optimizer constructor may call it, then the train loop does), and so do ``before_train`` hooks. A
model that freezes its backbone there (``train()`` of a frozen foundation backbone, mmaction2's
``partial_bn``, adapters or LoRA on a frozen backbone) leaves plain DDP with parameters it
registered and that never get a gradient: with ``find_unused_parameters=False`` it stops at the
second iteration, with ``True`` it trains but carries them. ``ReconfigurableDDP`` follows the freeze,
so its usage report alone would judge plain DDP on the set after it. A :class:`WrapTimeWatch` keeps
the flags of the wrap, notes each phase that changes them until the first iteration (the optimizer's
construction, each hook's ``before_train``, the loop's ``model.train()``), and
:class:`WrapTimeFinding` says what changed where (the user's ``file:line``), what plain DDP does with
it and the two ways out.
"""
import inspect
import os
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.model import BaseModel, BaseModule
from torch import nn

from .model_from_config import config_path
from .report import HEAD, ParamUsage, group_by_module
from .trainable import TrainableSet

_SETS_FLAG = re.compile(r'requires_grad(_\s*\(|\s*=[^=])')
_SELF_CALL = re.compile(r'self\.(\w+)\s*\(')
_LIBRARY_TRAIN = (nn.Module.train, BaseModule.train, BaseModel.train)
OWN_HOOK = 'DDPAutoTuneHook'  # its before_train freezes the config's switched-off branches
LOOP = "the train loop's model.train() before iteration 1"
NOT_NEEDED = 'find_unused_parameters=True was not needed'
CRASH = ('"Expected to have finished reduction in the prior iteration before starting a new one" '
         'at iteration 2')


def registered(ddp: nn.Module) -> Set[int]:
    """ids of the parameters in a built DDP's reducer (its buckets), read before it is replaced."""
    return {id(p) for b in ddp.reducer._get_zeros_like_grad_buckets() for p in b.parameters()}


def _short(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith('..') else rel


def setter_lines(func: Callable, owner: type, depth: int = 1) -> List[str]:
    """``path:line: code`` of each line of ``func`` that sets ``requires_grad``, looking ``depth``
    levels into the methods of ``owner`` it calls (``train()`` -> ``self._freeze_stages()``)."""
    try:
        lines, start = inspect.getsourcelines(func)
        path = _short(inspect.getsourcefile(func))
    except (OSError, TypeError):
        return []
    found = [f'{path}:{start + i}: {line.strip()}' for i, line in enumerate(lines)
             if _SETS_FLAG.search(line) and not line.strip().startswith('#')]
    if found or depth == 0:
        return found
    for name in dict.fromkeys(_SELF_CALL.findall(''.join(lines))):
        method = getattr(owner, name, None)
        if inspect.isfunction(method):
            found += setter_lines(method, owner, depth - 1)
    return found


def _where_defined(func: Callable) -> str:
    try:
        return f'{_short(inspect.getsourcefile(func))}:{inspect.getsourcelines(func)[1]}'
    except (OSError, TypeError):
        return '(source not found)'


@dataclass
class Change:
    """One phase's change of the trainable set, and where in the user's code it was made."""
    phase: str                 # 'train() of Backbone', 'FreezeHook.before_train', ...
    frozen: List[str]
    unfrozen: List[str]
    lines: List[str] = field(default_factory=list)  # path:line: code that sets requires_grad
    init: Optional[str] = None  # where to freeze before the wrap: Class.__init__ (path:line)


def _train_culprits(module: nn.Module, names: Sequence[str]) -> List[Change]:
    """The modules owning ``names`` whose own ``train()`` sets ``requires_grad`` (outermost first),
    each with the lines and its ``__init__``."""
    out, seen = [], set()
    for prefix, sub in module.named_modules():
        cls = type(sub)
        mine = [n for n in names if not prefix or n.startswith(prefix + '.')]
        if not mine or cls in seen or cls.train in _LIBRARY_TRAIN:
            continue
        seen.add(cls)
        lines = setter_lines(cls.train, cls)
        if lines:
            out.append(Change(f'train() of {cls.__name__}', [], [], lines,
                              f'{cls.__name__}.__init__ at {_where_defined(cls.__init__)}'))
    return out


class WrapTimeWatch:
    """The flags DDP was built with (``built``, over ``trainable``'s parameters), and each phase's
    change until the first iteration."""

    def __init__(self, trainable: TrainableSet, reducer: Optional[Set[int]] = None) -> None:
        self.names, self.params = trainable.names, trainable.params
        self.built = trainable.built if reducer is None else [id(p) in reducer
                                                              for p in self.params]
        self.changes: List[Change] = []
        self.own: Set[str] = set()  # changed by this package's hook: not the config's doing
        self._last = list(self.built)
        self._patched: List[Any] = []

    def note(self, label: str, module: nn.Module, owner: Optional[type] = None,
             method: Optional[str] = None) -> None:
        """Record what changed since the last note, made in ``label`` (a phase): by the class
        ``owner``'s ``method`` where that sets the flag itself, else by ``train()`` of a module
        owning the parameters where its ``train`` sets it."""
        now = [p.requires_grad for p in self.params]
        diff = [i for i, (a, b) in enumerate(zip(self._last, now)) if a != b]
        self._last = now
        if not diff:
            return
        frozen = [self.names[i] for i in diff if not now[i]]
        unfrozen = [self.names[i] for i in diff if now[i]]
        culprits = _train_culprits(module, frozen + unfrozen)
        # this package's hook: its rebuild calls model.train(), as the loop would
        if owner is not None and owner.__name__ == OWN_HOOK:
            if not culprits:  # the config's switched-off branches: not plain DDP's concern
                self.own.update(frozen + unfrozen)
                return
            label, owner = LOOP, None
        func = getattr(owner, method, None) if method else None
        own = setter_lines(func, owner) if inspect.isfunction(func) else []
        calls_train = bool(own) and '.train(' in inspect.getsource(func)
        if culprits and (not own or calls_train):
            first = culprits[0]
            self.changes.append(replace(first, phase=f'{first.phase}, called in {label}',
                                        frozen=frozen, unfrozen=unfrozen))
        else:
            self.changes.append(Change(label, frozen, unfrozen, own))

    def watch_hooks(self, runner) -> None:
        """Note after each hook's ``before_train`` (patched on the instance until :meth:`stop`)."""
        for hook in runner.hooks:
            if 'before_train' in vars(hook):
                continue
            def call(run, _hook=hook, _original=hook.before_train):
                _original(run)
                self.note(f'{type(_hook).__name__}.before_train', _module(run), type(_hook),
                          'before_train')
            hook.before_train = call
            self._patched.append(hook)

    def stop(self) -> None:
        for hook in self._patched:
            del hook.before_train
        self._patched = []

    def finding(self, module: nn.Module, find_unused: bool) -> Optional['WrapTimeFinding']:
        """What differs between the wrap and now (None: nothing)."""
        now = [p.requires_grad for p in self.params]
        numel = {n: p.numel() for n, p in zip(self.names, self.params)}
        frozen = [n for n, a, b in zip(self.names, self.built, now) if a and not b
                  and n not in self.own]
        unfrozen = [n for n, a, b in zip(self.names, self.built, now) if b and not a
                    and n not in self.own]
        if not frozen and not unfrozen:
            return None
        params = [ParamUsage(n, numel[n], 'frozen' if n in frozen else 'unfrozen'
                             if n in unfrozen else 'kept', 0.0, []) for n in self.names]
        groups = [(g.prefix, len(g.names), g.numel, g.kind)
                  for g in group_by_module(params, key=lambda p: p.kind) if g.kind != 'kept']
        return WrapTimeFinding(frozen, unfrozen, sum(numel[n] for n in frozen), groups,
                               [c for c in self.changes if set(c.frozen + c.unfrozen) - self.own],
                               find_unused,
                               f'{type(module).__name__}.__init__ at '
                               f'{_where_defined(type(module).__init__)}')


def _module(runner) -> nn.Module:
    model = runner.model
    return getattr(model, 'module', model)


@dataclass
class WrapTimeFinding:
    """Parameters whose ``requires_grad`` changed between the wrap and the first iteration."""
    frozen: List[str]
    unfrozen: List[str]
    frozen_numel: int
    groups: List[tuple]   # (module prefix, params, elems, 'frozen' / 'unfrozen')
    changes: List[Change]
    find_unused: bool     # what the config's DDP runs with
    model: str            # where the model's __init__ is: Class.__init__ at path:line
    config_lines: str = ''  # the package's wrapper, as the config would have it

    def to_dict(self) -> Dict[str, Any]:
        return dict(asdict(self), crash=self.crash_reason(self.find_unused, False))

    def crash_reason(self, find_unused: bool, static_graph: bool) -> Optional[str]:
        """Why plain DDP as the config builds it stops (None: it trains)."""
        if not self.frozen or find_unused or static_graph:
            return None
        return (f'find_unused_parameters=False, and {len(self.frozen)} parameters DDP registered '
                f'when the Runner wrapped the model were frozen afterwards ({self._where()}): DDP '
                f'waits for their gradients and stops with {CRASH}')

    def qualify(self, reasons: List[str]) -> List[str]:
        """A plan's reasons, where "True was not needed" holds under this package's wrapper only."""
        if not self.frozen:
            return reasons
        return [f'plain DDP needs find_unused_parameters=True here ({len(self.frozen)} parameters '
                'it registered at the wrap are frozen afterwards, see above); under '
                f'ReconfigurableDDP, which rebuilds DDP with the set that trains: {r}'
                if r.startswith(NOT_NEEDED) else r for r in reasons]

    def _where(self) -> str:
        return '; '.join(f'{c.phase}' + (f': {c.lines[0]}' if c.lines else '')
                         for c in self.changes) or 'before iteration 1'

    def lines(self) -> List[str]:
        """The finding first, plain DDP's behaviour under each setting, the two ways out."""
        width = max([len(HEAD)] + [len(g[0]) for g in self.groups])
        out = [f'the trainable set changed after DDP was built: the Runner wraps the model in DDP '
               f'in its __init__, before the optimizer is built, before_train hooks and '
               f'model.train() run; {self._counts()} before iteration 1:',
               f'  {HEAD.ljust(width)}  params    elems  change']
        out += [f'  {p.ljust(width)}  {n:>6}  {e:>7}  {kind}' for p, n, e, kind in self.groups]
        for c in self.changes:
            out.append(f'  changed in {c.phase}' + ''.join(f'\n    {line}' for line in c.lines))
        if self.frozen:
            out.append(
                'plain DDP (MMDistributedDataParallel) reduces the set it registered at the wrap: '
                f'with find_unused_parameters=False it waits for the {len(self.frozen)} frozen '
                f'parameters and stops with {CRASH}; with True it trains, but walks the autograd '
                f'graph every step and all-reduces their {self.frozen_numel} elements in every '
                'step' + (' (this config: ' + ('True)' if self.find_unused else 'False)')))
        if self.unfrozen:
            out.append(f'plain DDP never averages the {len(self.unfrozen)} unfrozen parameters, '
                       'under either setting: the replicas drift apart silently')
        init = next((c.init for c in self.changes if c.init), self.model)
        again = ' (a freeze in train() may stay: it sets the same flags again)' \
            if any(c.init for c in self.changes) else ''
        out += ['two ways out:',
                f'  - change requires_grad before the wrap, in __init__ ({init}), to the flags '
                f'training starts with: DDP then registers what trains, nothing to pay at run time'
                f'{again}',
                '  - or this package\'s wrapper, which rebuilds DDP with the set that trains when '
                'it changes: one rebuild at the first iteration (a broadcast of the parameters), '
                'and DDPAutoTuneHook\'s first iterations trained as find_unused_parameters=True '
                'would:'] + [f'      {line}' for line in self.config_lines.splitlines()]
        return out

    def _counts(self) -> str:
        parts = []
        if self.frozen:
            parts.append(f'{len(self.frozen)} parameters it registered were frozen')
        if self.unfrozen:
            parts.append(f'{len(self.unfrozen)} it left out were unfrozen')
        return ' and '.join(parts)


def watch(runner) -> None:
    """At ``before_run`` (the optimizer is built): note its change, watch the ``before_train``
    hooks. Does nothing where the model is not in this package's wrapper."""
    watcher = getattr(runner.model, 'wrap_time', None)
    if watcher is None:
        return
    constructor = _constructor(runner)
    label = (f'the optimizer constructor {constructor.__name__}' if constructor is not None
             else 'the optimizer\'s construction')
    watcher.note(label, _module(runner), constructor, '__call__')
    watcher.watch_hooks(runner)


def _constructor(runner) -> Optional[type]:
    """The config's optimizer constructor class, to read its source (None: the default)."""
    from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

    cfg = runner.cfg.get('optim_wrapper') or {}
    name = cfg.get('constructor') if isinstance(cfg, dict) else None
    if name is None:
        return None
    cls = OPTIM_WRAPPER_CONSTRUCTORS.get(name) if isinstance(name, str) else name
    return cls if isinstance(cls, type) else None


def finish(runner) -> Optional[WrapTimeFinding]:
    """At the first ``before_train_iter``: note the loop's ``model.train()``, stop watching, and
    log the finding (every rank), or None where nothing changed since the wrap."""
    model = runner.model
    watcher = getattr(model, 'wrap_time', None)
    if watcher is None:
        return None
    model.wrap_time = None
    watcher.stop()
    watcher.note(LOOP, _module(runner))
    find_unused = bool(model.config_kwargs.get('find_unused_parameters'))
    found = watcher.finding(_module(runner), find_unused)
    if found is not None:
        found.config_lines = wrapper_lines(find_unused, is_lazy(runner.cfg.filename or ''))
        print_log('[mmddp_hooks] ' + '\n'.join(found.lines()), logger='current')
    return found


def wrapper_lines(find_unused: bool, lazy: bool = False) -> str:
    """The config lines of this package's wrapper and hook, as a new-style (``lazy``) config or
    an old-style one has them."""
    if lazy:
        lines = ['from mmddp_hooks import DDPAutoTuneHook, ReconfigurableDDP',
                 'model_wrapper_cfg = dict(type=ReconfigurableDDP, '
                 f'find_unused_parameters={find_unused})',
                 'custom_hooks = [dict(type=DDPAutoTuneHook, probe_iters=4)]']
    else:
        lines = ["custom_imports = dict(imports=['mmddp_hooks'], allow_failed_imports=False)",
                 "model_wrapper_cfg = dict(type='ReconfigurableDDP', "
                 f'find_unused_parameters={find_unused})',
                 "custom_hooks = [dict(type='DDPAutoTuneHook', probe_iters=4)]"]
    return '\n'.join(lines)


def is_lazy(config: str) -> bool:
    """A new-style config: its types are imported classes, not registry names."""
    try:
        return Config._is_lazy_import(config_path(config))
    except Exception:  # unreadable here: the old style's lines are the safe default
        return False
