"""Classify measured parameter usage and group it by module, as plain data.

Input is a :class:`Usage`: a boolean array ``used[rank, iteration, param]`` over the reducer's
parameters (DDP's own criterion: did the parameter receive a gradient in that backward). Nothing here
touches processes or modules, so every rule is unit-testable on hand-written arrays.

A gradient can arrive and be exactly zero: research code keeps idle branches "used" with
zero-weighted terms (``loss + p.sum() * 0.0``) only because DDP crashes otherwise. Where the probe
saw such a term reach a parameter whose gradient was zero, that rank-iteration is *kept alive*:
DDP counts it as used, the report names it, and :attr:`UsageReport.without_keepalive` is the usage
with those gradients counted as ``None``, the usage the model has once the terms are deleted. A
rank-iteration whose every gradient was exactly zero (a batch whose targets the pipeline filtered
away, a loss of zero-weighted terms only) had no signal: it says nothing about which terms keep what
alive, so it is left out of that inference and counted on its own. Terms
in installed libraries (mmdet's RoI extractor keeps the graph whole for a batch without boxes) are
named in one line: they are the library's design, not the user's to delete.
"""
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import batch_kinds
from .text import INSTALLED, is_library, names

ALWAYS = 'always used'
NEVER = 'never used'
RANK_FIXED = 'used on some ranks only'
DYNAMIC = 'dynamic'
HEAD = 'module / parameter'


@dataclass
class Usage:
    names: List[str]
    numels: List[int]
    used: np.ndarray  # bool, shape (ranks, iterations, params)
    reentrant_checkpoint: bool = False  # seen in the loss graph: find_unused=True cannot run
    # the gradient that arrived was exactly zero, and a zero-weighted term (x * 0) reached the
    # parameter in that backward: bool, the shape of ``used``, or None where not recorded
    zero: Optional[np.ndarray] = None
    zero_weighted: Optional[np.ndarray] = None
    zero_terms: Dict[str, List[str]] = field(default_factory=dict)  # name -> where the terms are
    batch: Optional[List[List[batch_kinds.Cell]]] = None  # per rank, per iteration
    counted: Optional[np.ndarray] = None  # (ranks, iterations): the cells classified; None: all

    def __post_init__(self) -> None:
        self.used = np.asarray(self.used, dtype=bool)
        if self.used.ndim != 3 or self.used.shape[2] != len(self.names):
            raise ValueError(f'usage array of shape {self.used.shape} does not match '
                             f'{len(self.names)} parameter names')
        if len(self.numels) != len(self.names):
            raise ValueError('one numel per parameter name is required')
        for key in ('zero', 'zero_weighted'):
            value = getattr(self, key)
            if value is not None:
                setattr(self, key, np.asarray(value, dtype=bool).reshape(self.used.shape))

    @property
    def no_signal(self) -> np.ndarray:
        """(ranks, iterations): a gradient arrived and every one was exactly zero."""
        if self.zero is None:
            return np.zeros(self.used.shape[:2], bool)
        return self.used.any(axis=2) & ~(self.used & ~self.zero).any(axis=2)

    @property
    def kept_alive(self) -> np.ndarray:
        """Rank-iterations in which a parameter was "used" only through a zero-weighted term,
        among those with a signal."""
        if self.zero is None or self.zero_weighted is None:
            return np.zeros_like(self.used)
        return self.used & self.zero & self.zero_weighted & ~self.no_signal[:, :, None]

    def without_keepalive(self, params: Optional[np.ndarray] = None) -> 'Usage':
        """The usage once the zero-weighted terms (of ``params``, a bool mask; default all) are
        deleted: those gradients would be None; rank-iterations without signal are not counted."""
        kept = self.kept_alive if params is None else self.kept_alive & params
        return Usage(self.names, self.numels, self.used & ~kept, self.reentrant_checkpoint,
                     batch=self.batch, counted=~self.no_signal)

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
    observed: int = 0          # rank-iterations the probe saw
    used_count: int = 0        # of which it got a gradient in
    kept_alive: int = 0        # of which that gradient was zero, through a zero-weighted term
    zero_terms: List[str] = field(default_factory=list)  # where those terms are
    explained_by: Optional[str] = None  # the batch attribute deciding its use: "data_tag='sam'"


@dataclass
class UsageGroup:
    prefix: str
    kind: str
    names: List[str]
    numel: int
    frequency: Tuple[float, float]  # min, max over the group
    ranks_used: List[int]
    explained_by: Optional[str] = None

    def describe(self) -> str:
        n = len(self.names)
        text = f'{self.prefix}: {n} param{"s" if n != 1 else ""}, {self.numel} elems, {self.kind}'
        only = f', only in batches with {self.explained_by}' if self.explained_by else ''
        if self.kind == RANK_FIXED:
            text += f' (used on rank{"s" if len(self.ranks_used) > 1 else ""} ' \
                    f'{", ".join(map(str, self.ranks_used))}{only})'
        elif self.kind == DYNAMIC:
            lo, hi = self.frequency
            text += f' (used in {_pct(lo)} of rank-iterations{only})' if lo == hi else \
                f' (used in {_pct(lo)}-{_pct(hi)} of rank-iterations{only})'
        return text


@dataclass
class UsageReport:
    n_ranks: int
    n_iters: int
    params: List[ParamUsage]
    groups: List[UsageGroup] = field(default_factory=list)
    reentrant_checkpoint: bool = False
    batch_kinds: Dict[str, Dict[str, int]] = field(default_factory=dict)  # attr -> value -> count
    min_seen: int = 3  # rank-iterations a batch kind needs before its usage counts as measured
    without_keepalive: Optional['UsageReport'] = None  # the usage once the terms are deleted
    no_signal: int = 0  # rank-iterations whose every gradient was exactly zero
    left_out: int = 0  # rank-iterations this classification does not count (no signal)

    @property
    def where(self) -> str:
        """'in 4 iterations on 2 ranks': how much the probe saw, for every message about it."""
        left = f' ({self.left_out} rank-iterations without signal left out)' \
            if self.left_out else ''
        return f'in {self.n_iters} iterations on {self.n_ranks} ranks{left}'

    @property
    def cells(self) -> int:
        """The rank-iterations this classification counts."""
        return self.n_ranks * self.n_iters - self.left_out

    @property
    def signal_cells(self) -> int:
        """The rank-iterations the keep-alive inference counts: those with a signal."""
        return self.cells - self.no_signal

    def names_of(self, kind: str) -> List[str]:
        return [p.name for p in self.params if p.kind == kind]

    def unused_names_on_rank(self, rank: int) -> List[str]:
        """Parameters this rank never used while some other rank did (the fixed per-rank set)."""
        return [p.name for p in self.params if p.kind == RANK_FIXED and rank not in p.ranks_used]

    @property
    def counts(self) -> Dict[str, int]:
        return {k: sum(p.kind == k for p in self.params) for k in (ALWAYS, NEVER, RANK_FIXED,
                                                                     DYNAMIC)}

    @property
    def kept_alive(self) -> List[ParamUsage]:
        """Parameters "used" through the user's zero-weighted terms in some rank-iteration."""
        return [p for p in self.params if p.kept_alive and not _library_only(p)]

    @property
    def kept_alive_by_libraries(self) -> List[ParamUsage]:
        """Parameters "used" only through zero-weighted terms in installed libraries."""
        return [p for p in self.params if p.kept_alive and _library_only(p)]

    def to_dict(self) -> dict:
        return {'n_ranks': self.n_ranks, 'n_iters': self.n_iters, 'counts': self.counts,
                'no_signal': self.no_signal, 'left_out': self.left_out,
                'reentrant_checkpoint': self.reentrant_checkpoint,
                'batch_kinds': self.batch_kinds,
                'kept_alive': [p.name for p in self.kept_alive],
                'kept_alive_by_libraries': [p.name for p in self.kept_alive_by_libraries],
                'without_keepalive': (self.without_keepalive.to_dict()
                                      if self.without_keepalive else None),
                'groups': [asdict(g) for g in self.groups],
                'params': [asdict(p) for p in self.params]}

    def summary_line(self) -> str:
        c = self.counts
        return (f'{c[ALWAYS]} always used, {c[NEVER]} never used, '
                f'{c[RANK_FIXED]} used on some ranks only, {c[DYNAMIC]} dynamic')

    def rows(self) -> List[str]:
        """The non-always groups, one fixed-width line per module prefix, under a header."""
        rows = [g for g in self.groups if g.kind != ALWAYS]
        if not rows:
            return []
        width = max(len(g.prefix) for g in rows)
        lines = [f'  {HEAD.ljust(width)}  params    elems  usage']
        for g in rows:
            usage = g.describe().split(', ', 2)[2]
            lines.append(f'  {g.prefix.ljust(width)}  {len(g.names):>6}  {g.numel:>7}  {usage}')
        return lines

    def table(self) -> str:
        """The usage table, then what qualifies it: batch kinds, sample size, keep-alive terms."""
        lines = [f'parameter usage over {self.n_iters} iterations on {self.n_ranks} ranks: '
                 f'{self.summary_line()}'] + self.rows()
        return '\n'.join(lines + self.notes())

    def notes(self) -> List[str]:
        out = []
        if self.batch_kinds:
            seen = '; '.join(f'{name}: ' + ', '.join(f'{v!r} {n}' for v, n in counts.items())
                             for name, counts in self.batch_kinds.items())
            out.append(f'batch kinds seen (rank-iterations): {seen}')
            rare = [f'{n} rank-iteration{"s" if n != 1 else ""} with {name}={v!r}'
                    for name, counts in self.batch_kinds.items() for v, n in counts.items()
                    if n < self.min_seen]
            if rare:
                out.append(f'only {", ".join(rare)}: usage in such batches is barely measured '
                           f'(fewer than {self.min_seen}); probe longer (--iters, probe_max_iters)')
        if self.no_signal:
            out.append(f'in {self.no_signal} rank-iteration{"s" if self.no_signal != 1 else ""} '
                       'the loss had no signal: empty targets? every gradient that arrived was '
                       'exactly zero (a batch whose targets the pipeline filtered away, a loss of '
                       'zero-weighted terms only); DDP counts those parameters as used, as it will '
                       'in training, but they are left out of the keep-alive inference')
        out += _sample_size_note(self.without_keepalive or self)
        if self.kept_alive:
            out += self._keepalive_lines()
        library = self.kept_alive_by_libraries
        if library:
            terms = sorted({_short(t) for p in library for t in p.zero_terms})
            out.append(f'kept alive by zero-weighted terms of installed libraries: {len(library)} '
                       f'params in up to {max(p.kept_alive for p in library)} of '
                       f'{self.n_ranks * self.n_iters} rank-iterations ({names(terms, 2, sep="; ")}): '
                       'the library keeps them in the graph on purpose (e.g. for a batch without '
                       'targets); DDP counts them as used, as it will in training')
        return out

    def _keepalive_lines(self) -> List[str]:
        kept = self.kept_alive
        cells = self.signal_cells
        lines = [f'kept alive by zero-weighted terms: {len(kept)} params got an exactly-zero '
                 'gradient through a term multiplied by 0 (e.g. loss + p.sum() * 0.0), so DDP '
                 'counted them as used:']
        mine = {p.name for p in kept}
        groups = group_by_module(self.params, key=lambda p: (p.name in mine, p.kept_alive,
                                                             tuple(p.zero_terms)))
        groups = [g for g in groups if g.names[0] in mine]
        width = max(len(g.prefix) for g in groups)
        lines.append(f'  {HEAD.ljust(width)}  params    elems  kept alive in  zero-weighted term')
        for g in groups:
            p = _by_name(self.params, g.names[0])
            term = '; '.join(p.zero_terms) or '(a multiplication by 0 in the autograd graph)'
            lines.append(f'  {g.prefix.ljust(width)}  {len(g.names):>6}  {g.numel:>7}  '
                         f'{f"{p.kept_alive} of {cells}":>13}  {term}')
        real = self.without_keepalive
        if real is not None:
            lines.append('without the zero-weighted terms (those gradients None, as DDP would see '
                         f'them): {real.summary_line()}')
            lines += real.rows()
        return lines


def _by_name(params: Sequence[ParamUsage], name: str) -> ParamUsage:
    return next(p for p in params if p.name == name)


def _library_only(p: ParamUsage) -> bool:
    """Every zero-weighted term that kept ``p`` alive (``path:line: code``) is in a library's code."""
    return bool(p.zero_terms) and all(is_library(t.split(':', 1)[0]) for t in p.zero_terms)


def _short(term: str) -> str:
    """An installed package's path from the package on: mmdet/models/...py:118."""
    for d in INSTALLED:
        if f'{d}/' in term:
            return term.split(f'{d}/', 1)[1].split(': ', 1)[0]
    return term


def _sample_size_note(report: UsageReport) -> List[str]:
    """Never used means no gradient in any of n rank-iterations: a parameter used at a rate below
    3/n would have gone unseen with 95% probability too (the rule of three). Said where that rate
    is above 5%: the sample cannot tell "never used" from "rarely used"."""
    n = report.cells
    if not report.names_of(NEVER) or not n or 3 / n <= 0.05:
        return []
    return [f'never used means no gradient in any of {n} rank-iterations: a parameter used in '
            f'fewer than {_pct(min(1.0, 3 / n))} of them could go unseen as well (95% confidence), '
            'so this sample cannot tell never used from rarely used; probe longer (--iters) if a '
            'branch runs only now and then']


def _pct(x: float) -> str:
    return f'{100 * x:.0f}%'


def classify(usage: Usage) -> List[ParamUsage]:
    """Each parameter's kind over the rank-iterations ``usage.counted`` (default all)."""
    used = usage.used
    counted = np.ones(used.shape[:2], bool) if usage.counted is None else usage.counted
    seen = counted.any(axis=1)  # ranks with a counted rank-iteration
    per_rank_any = (used & counted[:, :, None]).any(axis=1)   # (ranks, params)
    per_rank_all = (used | ~counted[:, :, None]).all(axis=1)
    observed = int(counted.sum())
    counts = (used & counted[:, :, None]).sum(axis=(0, 1))
    freq = counts / observed if observed else np.zeros(len(usage.names))
    kept = usage.kept_alive.sum(axis=(0, 1))
    explained = batch_kinds.explain(used, usage.batch, counted)
    out = []
    for i, name in enumerate(usage.names):
        if per_rank_all[seen, i].all():
            kind = ALWAYS
        elif not per_rank_any[:, i].any():
            kind = NEVER
        elif (per_rank_all[seen, i] == per_rank_any[seen, i]).all():
            kind = RANK_FIXED  # each rank: every iteration or none, and ranks differ
        else:
            kind = DYNAMIC
        out.append(ParamUsage(name=name, numel=int(usage.numels[i]), kind=kind,
                              frequency=float(freq[i]),
                              ranks_used=[int(r) for r in np.nonzero(per_rank_any[:, i])[0]],
                              observed=observed, used_count=int(counts[i]),
                              kept_alive=int(kept[i]),
                              zero_terms=list(usage.zero_terms.get(name, [])) if kept[i] else [],
                              explained_by=explained[i]))
    return out


def _prefixes(name: str) -> List[str]:
    parts = name.split('.')
    return ['.'.join(parts[:k]) for k in range(1, len(parts) + 1)]


def _group_key(p: ParamUsage) -> Tuple[Any, ...]:
    return (p.kind, tuple(p.ranks_used) if p.kind == RANK_FIXED else (), p.explained_by)


def group_by_module(params: Sequence[ParamUsage],
                    key: Callable[[ParamUsage], Any] = _group_key) -> List[UsageGroup]:
    """Collapse parameters into the shortest module prefix whose parameters all behave alike
    (the same ``key``: by default kind, ranks and the batch attribute that explains them).

    ``resolution_distill.*`` all never used becomes one row; a module with one dead parameter among
    used ones keeps that parameter's own name. Rows keep the reducer's order.
    """
    by_prefix: Dict[str, List[ParamUsage]] = {}
    for p in params:
        for pre in _prefixes(p.name):
            by_prefix.setdefault(pre, []).append(p)
    groups: Dict[str, UsageGroup] = {}
    for p in params:
        k = key(p)
        prefix = next(pre for pre in _prefixes(p.name) if all(key(q) == k for q in by_prefix[pre]))
        g = groups.get(prefix)
        if g is None:
            groups[prefix] = UsageGroup(prefix=prefix, kind=p.kind, names=[p.name], numel=p.numel,
                                        frequency=(p.frequency, p.frequency),
                                        ranks_used=list(p.ranks_used), explained_by=p.explained_by)
        else:
            g.names.append(p.name)
            g.numel += p.numel
            g.frequency = (min(g.frequency[0], p.frequency), max(g.frequency[1], p.frequency))
            g.ranks_used = sorted(set(g.ranks_used) | set(p.ranks_used))
    return list(groups.values())


def build_report(usage: Usage, min_seen: int = 3) -> UsageReport:
    params = classify(usage)
    report = UsageReport(n_ranks=usage.n_ranks, n_iters=usage.n_iters, params=params,
                         groups=group_by_module(params),
                         reentrant_checkpoint=usage.reentrant_checkpoint,
                         batch_kinds=batch_kinds.value_counts(usage.batch or []), min_seen=min_seen,
                         no_signal=int(usage.no_signal.sum()),
                         left_out=0 if usage.counted is None else int((~usage.counted).sum()))
    kept = {p.name for p in report.kept_alive}
    mine = np.array([p.name in kept for p in params], bool)
    if mine.any():
        report.without_keepalive = replace(build_report(usage.without_keepalive(mine), min_seen),
                                           batch_kinds={}, no_signal=0)
    return report
