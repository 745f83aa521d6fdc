"""Classify measured parameter usage and group it by module, as plain data.

Input is a :class:`Usage`: a boolean array ``used[rank, iteration, param]`` over the reducer's
parameters (DDP's own criterion: did the parameter receive a gradient in that backward). Nothing here
touches processes or modules, so every rule is unit-testable on hand-written arrays.
"""
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

ALWAYS = 'always used'
NEVER = 'never used'
RANK_FIXED = 'used on some ranks only'
DYNAMIC = 'dynamic'


@dataclass
class Usage:
    names: List[str]
    numels: List[int]
    used: np.ndarray  # bool, shape (ranks, iterations, params)
    reentrant_checkpoint: bool = False  # seen in the loss graph: find_unused=True cannot run

    def __post_init__(self) -> None:
        self.used = np.asarray(self.used, dtype=bool)
        if self.used.ndim != 3 or self.used.shape[2] != len(self.names):
            raise ValueError(f'usage array of shape {self.used.shape} does not match '
                             f'{len(self.names)} parameter names')
        if len(self.numels) != len(self.names):
            raise ValueError('one numel per parameter name is required')

    @property
    def n_ranks(self) -> int:
        return self.used.shape[0]

    @property
    def n_iters(self) -> int:
        return self.used.shape[1]


@dataclass
class ParamUsage:
    name: str
    numel: int
    kind: str
    frequency: float           # fraction of (rank, iteration) cells with a gradient
    ranks_used: List[int]      # ranks on which it was used at least once


@dataclass
class UsageGroup:
    prefix: str
    kind: str
    names: List[str]
    numel: int
    frequency: Tuple[float, float]  # min, max over the group
    ranks_used: List[int]

    def describe(self) -> str:
        n = len(self.names)
        text = f'{self.prefix}: {n} param{"s" if n != 1 else ""}, {self.numel} elems, {self.kind}'
        if self.kind == RANK_FIXED:
            text += f' (used on rank{"s" if len(self.ranks_used) > 1 else ""} ' \
                    f'{", ".join(map(str, self.ranks_used))})'
        elif self.kind == DYNAMIC:
            lo, hi = self.frequency
            text += f' (used in {_pct(lo)} of rank-iterations)' if lo == hi else \
                f' (used in {_pct(lo)}-{_pct(hi)} of rank-iterations)'
        return text


@dataclass
class UsageReport:
    n_ranks: int
    n_iters: int
    params: List[ParamUsage]
    groups: List[UsageGroup] = field(default_factory=list)
    reentrant_checkpoint: bool = False

    @property
    def where(self) -> str:
        """'in 4 iterations on 2 ranks': how much the probe saw, for every message about it."""
        return f'in {self.n_iters} iterations on {self.n_ranks} ranks'

    def names_of(self, kind: str) -> List[str]:
        return [p.name for p in self.params if p.kind == kind]

    def unused_names_on_rank(self, rank: int) -> List[str]:
        """Parameters this rank never used while some other rank did (the fixed per-rank set)."""
        return [p.name for p in self.params if p.kind == RANK_FIXED and rank not in p.ranks_used]

    @property
    def counts(self) -> Dict[str, int]:
        return {k: sum(p.kind == k for p in self.params) for k in (ALWAYS, NEVER, RANK_FIXED,
                                                                     DYNAMIC)}

    def to_dict(self) -> dict:
        return {'n_ranks': self.n_ranks, 'n_iters': self.n_iters, 'counts': self.counts,
                'reentrant_checkpoint': self.reentrant_checkpoint,
                'groups': [asdict(g) for g in self.groups],
                'params': [asdict(p) for p in self.params]}

    def table(self) -> str:
        """A fixed-width table of the non-always groups, one line per module prefix."""
        c = self.counts
        lines = [f'parameter usage over {self.n_iters} iterations on {self.n_ranks} ranks: '
                 f'{c[ALWAYS]} always used, {c[NEVER]} never used, '
                 f'{c[RANK_FIXED]} used on some ranks only, {c[DYNAMIC]} dynamic']
        rows = [g for g in self.groups if g.kind != ALWAYS]
        if not rows:
            return lines[0]
        width = max(len(g.prefix) for g in rows)
        lines.append(f'  {"module / parameter".ljust(width)}  params    elems  usage')
        for g in rows:
            usage = g.describe().split(', ', 2)[2]
            lines.append(f'  {g.prefix.ljust(width)}  {len(g.names):>6}  {g.numel:>7}  {usage}')
        return '\n'.join(lines)


def _pct(x: float) -> str:
    return f'{100 * x:.0f}%'


def classify(usage: Usage) -> List[ParamUsage]:
    used = usage.used
    per_rank_any = used.any(axis=1)   # (ranks, params)
    per_rank_all = used.all(axis=1)
    freq = used.mean(axis=(0, 1)) if used.size else np.zeros(len(usage.names))
    out = []
    for i, name in enumerate(usage.names):
        if per_rank_all[:, i].all():
            kind = ALWAYS
        elif not per_rank_any[:, i].any():
            kind = NEVER
        elif (per_rank_all[:, i] == per_rank_any[:, i]).all():
            kind = RANK_FIXED  # each rank: every iteration or none, and ranks differ
        else:
            kind = DYNAMIC
        out.append(ParamUsage(name=name, numel=int(usage.numels[i]), kind=kind,
                              frequency=float(freq[i]),
                              ranks_used=[int(r) for r in np.nonzero(per_rank_any[:, i])[0]]))
    return out


def _prefixes(name: str) -> List[str]:
    parts = name.split('.')
    return ['.'.join(parts[:k]) for k in range(1, len(parts) + 1)]


def _group_key(p: ParamUsage) -> Tuple[str, Tuple[int, ...]]:
    return (p.kind, tuple(p.ranks_used) if p.kind == RANK_FIXED else ())


def group_by_module(params: Sequence[ParamUsage]) -> List[UsageGroup]:
    """Collapse parameters into the shortest module prefix whose parameters all behave alike.

    ``resolution_distill.*`` all never used becomes one row; a module with one dead parameter among
    used ones keeps that parameter's own name. Rows keep the reducer's order.
    """
    by_prefix: Dict[str, List[ParamUsage]] = {}
    for p in params:
        for pre in _prefixes(p.name):
            by_prefix.setdefault(pre, []).append(p)
    groups: Dict[str, UsageGroup] = {}
    for p in params:
        key = _group_key(p)
        prefix = next(pre for pre in _prefixes(p.name)
                      if all(_group_key(q) == key for q in by_prefix[pre]))
        g = groups.get(prefix)
        if g is None:
            groups[prefix] = UsageGroup(prefix=prefix, kind=p.kind, names=[p.name], numel=p.numel,
                                        frequency=(p.frequency, p.frequency),
                                        ranks_used=list(p.ranks_used))
        else:
            g.names.append(p.name)
            g.numel += p.numel
            g.frequency = (min(g.frequency[0], p.frequency), max(g.frequency[1], p.frequency))
            g.ranks_used = sorted(set(g.ranks_used) | set(p.ranks_used))
    return list(groups.values())


def build_report(usage: Usage) -> UsageReport:
    params = classify(usage)
    return UsageReport(n_ranks=usage.n_ranks, n_iters=usage.n_iters, params=params,
                       groups=group_by_module(params),
                       reentrant_checkpoint=usage.reentrant_checkpoint)
