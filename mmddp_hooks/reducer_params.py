"""DDP's reducer parameter order, with every name each parameter goes by.

DDP reports unused parameters by index into the reducer's list, which it builds (``torch 2.x``,
``DistributedDataParallel._build_params_for_reducer``) as: ``named_modules()`` order, each module's
``named_parameters(recurse=False)``, only ``requires_grad``, minus names in the ignore set (keyed
``f'{module_name}.{param_name}'``, so root-module parameters are ``'.scale'``), deduplicated by tensor
identity with the first alias winning. Reproducing that here is what turns indices into names.
"""
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Set, Tuple

from torch import nn


@dataclass
class ReducerParam:
    index: int
    name: str                 # the first alias: what ``named_parameters()`` calls it
    param: nn.Parameter
    aliases: List[str] = field(default_factory=list)      # every dotted name, first first
    ignore_keys: List[str] = field(default_factory=list)  # the keys DDP's ignore set matches

    @property
    def numel(self) -> int:
        return self.param.numel()


def _ignore_key(module_name: str, param_name: str) -> str:
    return f'{module_name}.{param_name}'


def _dotted(module_name: str, param_name: str) -> str:
    return f'{module_name}.{param_name}' if module_name else param_name


def param_aliases(module: nn.Module) -> Dict[int, List[Tuple[str, str]]]:
    """``id(param) -> [(module_name, param_name), ...]`` over every place the parameter is owned."""
    owners: Dict[int, List[Tuple[str, str]]] = {}
    for module_name, mod in module.named_modules(remove_duplicate=False):
        for param_name, p in mod.named_parameters(recurse=False):
            pair = (module_name, param_name)
            if pair not in owners.setdefault(id(p), []):
                owners[id(p)].append(pair)
    return owners


def reducer_params(module: nn.Module,
                   ignored: Optional[Iterable[str]] = None) -> List[ReducerParam]:
    """The reducer's parameter list for ``DistributedDataParallel(module)``, in index order.

    Args:
        module: the module DDP wraps (``ddp.module``, not the wrapper).
        ignored: DDP ignore keys; defaults to ``module._ddp_params_and_buffers_to_ignore``.
    """
    if ignored is None:
        ignored = getattr(module, '_ddp_params_and_buffers_to_ignore', ())
    ignored_set: Set[str] = set(ignored)
    owners = param_aliases(module)
    seen: Set[int] = set()
    out: List[ReducerParam] = []
    for module_name, mod in module.named_modules():
        for param_name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or _ignore_key(module_name, param_name) in ignored_set:
                continue
            if id(p) in seen:
                continue
            seen.add(id(p))
            pairs = owners[id(p)]
            out.append(ReducerParam(
                index=len(out),
                name=_dotted(*pairs[0]),
                param=p,
                aliases=[_dotted(m, n) for m, n in pairs],
                ignore_keys=[_ignore_key(m, n) for m, n in pairs]))
    return out


def ignore_keys_for(module: nn.Module, names: Iterable[str]) -> List[str]:
    """Every DDP ignore key under which the named parameters appear (all aliases of tied ones).

    ``names`` are dotted parameter names (any alias). Raises ``KeyError`` naming the first
    unknown one.
    """
    by_alias: Dict[str, List[str]] = {}
    for pairs in param_aliases(module).values():
        keys = [_ignore_key(m, n) for m, n in pairs]
        for m, n in pairs:
            by_alias[_dotted(m, n)] = keys
    keys_out: List[str] = []
    for name in names:
        if name not in by_alias:
            raise KeyError(f'no parameter named {name!r} in {type(module).__name__}')
        keys_out.extend(k for k in by_alias[name] if k not in keys_out)
    return keys_out
