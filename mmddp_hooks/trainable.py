"""What DDP averages now: the trainable set the wrapper last built its reducer from, and its changes.

DDP fixes its reducer from ``requires_grad`` when it is built. A parameter unfrozen later gets local
gradients that plain DDP never averages (the replicas drift apart silently); one frozen later leaves a
``find_unused_parameters=False`` reducer waiting for a gradient that never comes. ``ReconfigurableDDP``
keeps one :class:`TrainableSet` per build, notices a change in the step where it shows (the guard's
flag exchange, or a store exchange where no guard runs) and rebuilds DDP on every rank before the
next forward.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set

import numpy as np
from mmengine.logging import MessageHub
from torch import nn

from .reducer_params import param_aliases, reducer_params
from .text import AND_MORE, names


@dataclass
class TrainableChange:
    """Parameters (first alias) that started or stopped requiring grad since DDP was built."""
    unfrozen: List[str] = field(default_factory=list)
    frozen: List[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.unfrozen or self.frozen)

    def describe(self) -> str:
        parts = []
        if self.unfrozen:
            parts.append(f'unfroze {len(self.unfrozen)} params ({names(self.unfrozen, 6, AND_MORE)})')
        if self.frozen:
            parts.append(f'froze {len(self.frozen)} params ({names(self.frozen, 6, AND_MORE)})')
        return ', '.join(parts) or 'changed nothing'


class TrainableSet:
    """Every parameter of ``module`` (deduplicated, first alias) and whether it required grad when
    DDP was last built: the set DDP's reducer averages, before the plan's ignore list. Parameters
    the user told DDP to ignore (``user_ignored``: DDP ignore keys) are left out: DDP never
    averages them, trainable or not."""

    def __init__(self, module: nn.Module, user_ignored: Sequence[str] = ()) -> None:
        keys = set(user_ignored)
        # DDP ignores a tied parameter only where every alias is ignored
        mine = {i for i, pairs in param_aliases(module).items()
                if all(f'{mn}.{pn}' in keys for mn, pn in pairs)}
        named = [(n, p) for n, p in module.named_parameters() if id(p) not in mine]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.built = [p.requires_grad for p in self.params]
        # in DDP's reducer: trainable at the build and not DDP-ignored
        self.averaged = {id(rp.param) for rp in reducer_params(module)}

    def current(self) -> List[bool]:
        return [p.requires_grad for p in self.params]

    def change(self, now: Optional[List[bool]] = None) -> TrainableChange:
        """What differs now from the build (an empty change when nothing does)."""
        now = self.current() if now is None else now
        if now == self.built:
            return TrainableChange()
        diff = np.flatnonzero(np.array(now) != np.array(self.built))
        return TrainableChange(unfrozen=[self.names[i] for i in diff if now[i]],
                               frozen=[self.names[i] for i in diff if not now[i]])


def optimizer_params(optim_wrapper: Any) -> Set[int]:
    """ids of every parameter in the optimizer(s) of an OptimWrapper or OptimWrapperDict."""
    wrappers = getattr(optim_wrapper, 'optim_wrappers', None)
    wrappers = wrappers.values() if wrappers else [optim_wrapper]
    return {id(p) for w in wrappers for g in w.optimizer.param_groups for p in g['params']}


def where_now() -> str:
    """'at iteration N' from MMEngine's message hub (1-based, as its log prints it), or ''."""
    it = MessageHub.get_current_instance().get_info('iter')
    return f' at iteration {it + 1}' if it is not None else ''


def rank_dependent_message(changes: Dict[int, TrainableChange], silent: Optional[List[int]] = None,
                           timeout_s: Optional[float] = None) -> str:
    """The error for a trainable set that changed on some ranks only (``changes``: by rank;
    ``silent``: the ranks that changed nothing, or, with ``timeout_s``, did not say in time)."""
    lines = [f'[mmddp_hooks] the trainable set (requires_grad) changed on some ranks only'
             f'{where_now()}:']
    for rank, change in sorted(changes.items()):
        lines.append(f'  rank {rank}: {change.describe()}')
    if silent and timeout_s is None:
        lines.append(f'  ranks {silent}: changed nothing')
    elif silent:
        lines.append(f'  ranks {silent}: reported no change within {timeout_s:g} s (they changed '
                     'nothing, or are stuck)')
    lines.append('DDP averages one set of parameters on every rank: a rank-dependent freeze would '
                 'let the replicas drift apart, so training stops here, before the optimizer step. '
                 'Change requires_grad on every rank at the same iteration (e.g. '
                 "TrainableScheduleHook), never under 'if rank == ...'.")
    return '\n'.join(lines)
