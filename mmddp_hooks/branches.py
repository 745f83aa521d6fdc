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


def standard_settings(cfg: Mapping) -> Dict[str, Any]:
    """The config keys that decide DDP's behaviour, as the report shows them."""
    wrapper = cfg.get('model_wrapper_cfg') or {}
    return {
        'find_unused_parameters': wrapper.get('find_unused_parameters',
                                              cfg.get('find_unused_parameters', False)),
        'model_wrapper_cfg': dict(wrapper) if wrapper else None,
        'sync_bn': cfg.get('sync_bn'),
        'launcher': cfg.get('launcher', 'none'),
    }
