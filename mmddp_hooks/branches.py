"""Config-declared branches: which config flag switches which modules/parameters on.

A config states what its users already know::

    ddp_branches = dict(
        sam_distill=dict(flag='model.use_sam_distill', modules=['sam_distill']),
        learnable_fusion=dict(flag='model.decode_head.use_learnable_fusion',
                              params=['decode_head.fusion_weights.*']))

Branches whose flag is off are frozen before DDP sees them (no search needed); branches whose flag is
on but whose parameters never get a gradient are likely bugs. Everything here is plain data and
checks that name the offending key, usable from the hook, ``tools/check_config.py`` and tests.
"""
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Dict, List, Mapping, Optional, Sequence

from torch import nn

CONFIG_KEY = 'ddp_branches'
_MISSING = object()


class BranchDeclarationError(ValueError):
    """A ``ddp_branches`` entry that cannot be right: the message names the key."""


@dataclass
class Branch:
    name: str
    flag: str
    enabled: bool
    modules: List[str] = field(default_factory=list)
    params: List[str] = field(default_factory=list)
    resolved: List[str] = field(default_factory=list)  # parameter names, once matched on a model

    def describe_flag(self) -> str:
        return f'{self.flag}={self.enabled}'


def lookup(cfg: Mapping, path: str) -> Any:
    """``cfg['a']['b']['c']`` for ``'a.b.c'``; ``_MISSING`` when any step is absent."""
    node: Any = cfg
    for part in path.split('.'):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _closest_parent(cfg: Mapping, path: str) -> str:
    parts = path.split('.')
    for k in range(len(parts) - 1, 0, -1):
        node = lookup(cfg, '.'.join(parts[:k]))
        if isinstance(node, Mapping):
            keys = ', '.join(sorted(map(str, node.keys()))[:12])
            return f" ({'.'.join(parts[:k])} has: {keys})"
    return ''


def parse_branches(declared: Optional[Mapping], cfg: Mapping) -> List[Branch]:
    """Validate a ``ddp_branches`` dict against the config and read each flag's value."""
    if not declared:
        return []
    if hasattr(cfg, 'to_dict'):  # an mmengine Config: look flags up in its plain dict
        cfg = cfg.to_dict()
    if not isinstance(declared, Mapping):
        raise BranchDeclarationError(f'{CONFIG_KEY} must be a dict of branch name -> '
                                     f'dict(flag=..., modules=[...], params=[...]), got '
                                     f'{type(declared).__name__}')
    branches = []
    for name, spec in declared.items():
        key = f'{CONFIG_KEY}.{name}'
        if not isinstance(spec, Mapping) or 'flag' not in spec:
            raise BranchDeclarationError(f"{key}: needs dict(flag='path.in.config', "
                                         'modules=[...] and/or params=[...])')
        unknown = set(spec) - {'flag', 'modules', 'params'}
        if unknown:
            raise BranchDeclarationError(f'{key}: unknown keys {sorted(unknown)}; '
                                         'allowed: flag, modules, params')
        modules, params = list(spec.get('modules', [])), list(spec.get('params', []))
        if not modules and not params:
            raise BranchDeclarationError(f'{key}: names no modules and no params')
        value = lookup(cfg, spec['flag'])
        if value is _MISSING:
            raise BranchDeclarationError(
                f"{key}.flag: '{spec['flag']}' does not exist in the config"
                f'{_closest_parent(cfg, spec["flag"])}')
        if not (value is None or isinstance(value, bool) or value in (0, 1)):
            raise BranchDeclarationError(f"{key}.flag: '{spec['flag']}' is {value!r}, "
                                         'not a boolean switch')
        branches.append(Branch(name=name, flag=spec['flag'], enabled=bool(value),
                               modules=modules, params=params))
    return branches


def _module_params(module_name: str, named: Sequence[str]) -> List[str]:
    prefix = module_name + '.'
    return [n for n in named if n.startswith(prefix)]


def resolve_branches(branches: List[Branch], model: nn.Module) -> List[Branch]:
    """Match each branch's module/parameter patterns (fnmatch globs) on the built model."""
    named = [n for n, _ in model.named_parameters()]
    module_names = [n for n, _ in model.named_modules() if n]
    owner: Dict[str, str] = {}
    for b in branches:
        found: List[str] = []
        for pattern in b.modules:
            mods = [m for m in module_names if fnmatchcase(m, pattern)]
            if not mods:
                raise BranchDeclarationError(
                    f"{CONFIG_KEY}.{b.name}.modules: '{pattern}' matches no module of "
                    f'{type(model).__name__} (top-level modules: '
                    f'{", ".join(n for n in module_names if "." not in n)})')
            for m in mods:
                found.extend(p for p in _module_params(m, named) if p not in found)
        for pattern in b.params:
            ps = [n for n in named if fnmatchcase(n, pattern)]
            if not ps:
                raise BranchDeclarationError(
                    f"{CONFIG_KEY}.{b.name}.params: '{pattern}' matches no parameter of "
                    f'{type(model).__name__}')
            found.extend(p for p in ps if p not in found)
        for p in found:
            if p in owner:
                raise BranchDeclarationError(
                    f"{CONFIG_KEY}.{b.name} overlaps {CONFIG_KEY}.{owner[p]}: both own '{p}'")
            owner[p] = b.name
        b.resolved = found
    return branches


_DDP_DEFAULT = "not set: DDP's default"


def _plain(node: Any) -> Any:
    """A ``ConfigDict`` as plain dicts, so settings pickle across ranks and print as JSON."""
    return node.to_dict() if hasattr(node, 'to_dict') else dict(node)


def _ignored_note(key: str, top: Any, wrapper: Optional[Mapping], why: str) -> str:
    """Why a top-level ``key`` never reaches DDP, naming the key that decides instead."""
    if wrapper is None:
        runs = f'{key}=False ({_DDP_DEFAULT})'
    else:
        runs = f'model_wrapper_cfg.{key}={wrapper.get(key, False)}'
        if key not in wrapper:
            runs += f' ({_DDP_DEFAULT})'
    fix = (f'Delete the top-level key: model_wrapper_cfg.{key} decides.' if wrapper and key in wrapper
           else 'Move the setting into model_wrapper_cfg.')
    return f'top-level {key}={top} is ignored: {why}, so DDP runs with {runs}. {fix}'


def standard_settings(cfg: Mapping) -> Dict[str, Any]:
    """The DDP settings MMEngine's ``Runner`` will apply for this config, and the keys it ignores.

    Mirrors ``Runner.wrap_model`` (mmengine 0.10): a ``model_wrapper_cfg`` (even an empty dict) is
    built on its own, so a top-level ``find_unused_parameters`` is never read and a key it lacks is
    DDP's default (False); without one, MMEngine passes only the top-level ``find_unused_parameters``.
    ``static_graph`` can only come from ``model_wrapper_cfg``. Every tool reports what the run will do,
    not what the config seems to say: ``dropped`` names each top-level key the run will not see and
    the key that decides instead. ``sync_bn`` and ``launcher`` are the config's (MMEngine reads them
    from there alone; ``tools/train.py`` sets ``launcher`` from ``--launcher``).
    """
    wrapper = cfg.get('model_wrapper_cfg')
    top_unused = cfg.get('find_unused_parameters', _MISSING)
    top_static = cfg.get('static_graph', _MISSING)
    dropped = []
    if wrapper is None:
        find_unused = False if top_unused is _MISSING else top_unused
        source = _DDP_DEFAULT if top_unused is _MISSING else 'top-level find_unused_parameters'
        static_graph = False
    else:
        find_unused = wrapper.get('find_unused_parameters', False)
        source = ('model_wrapper_cfg' if 'find_unused_parameters' in wrapper
                  else f'model_wrapper_cfg, {_DDP_DEFAULT}')
        static_graph = wrapper.get('static_graph', False)
        if top_unused is not _MISSING:
            source += f'; top-level find_unused_parameters={top_unused} is ignored'
            dropped.append(_ignored_note(
                'find_unused_parameters', top_unused, wrapper,
                'model_wrapper_cfg is given and MMEngine builds the wrapper from it alone'))
    if top_static is not _MISSING:
        dropped.append(_ignored_note('static_graph', top_static, wrapper,
                                     'MMEngine never reads it (only model_wrapper_cfg reaches DDP)'))
    return {
        'find_unused_parameters': find_unused,
        'find_unused_parameters_from': source,
        'static_graph': static_graph,
        'model_wrapper_cfg': None if wrapper is None else _plain(wrapper),
        'sync_bn': cfg.get('sync_bn'),
        'launcher': cfg.get('launcher', 'none'),
        'dropped': dropped,
    }
