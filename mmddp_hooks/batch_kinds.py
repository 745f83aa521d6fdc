"""Batch kinds: which attribute of a batch (its samples' ``data_tag``, dataset or task) explains
usage that changes from one iteration to the next, and whether the probe saw each kind enough.

Research code often draws the batch kind at random on each rank every iteration (a sampler mixing
datasets), and each kind trains its own branch. A short probe can then see one kind only and call
the other kind's branch never used. The probe records these attributes per rank-iteration; the
functions here, pure and unit-testable, decide whether to probe on and name the attribute whose
value decides each parameter's use.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

# metainfo keys that name a batch's kind; others (paths, ids) differ on every sample
ATTRIBUTES = ('data_tag', 'dataset', 'dataset_name', 'task', 'task_name', 'data_source', 'source',
              'batch_kind')
MAX_VALUES = 8  # an attribute with more distinct values is an identifier, not a kind
Cell = Dict[str, Tuple[str, ...]]  # attribute -> the values in one rank-iteration's batch


def _values(item: Any, name: str) -> List[str]:
    meta = getattr(item, 'metainfo', None)
    source = meta if isinstance(meta, dict) else item if isinstance(item, dict) else {}
    value = source.get(name)
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if isinstance(v, (str, int, bool))]
    return [str(value)] if isinstance(value, (str, int, bool)) else []


def batch_attributes(batch: Any, names: Sequence[str] = ATTRIBUTES) -> Cell:
    """The named attributes of one batch, as sorted tuples of their string values: from the batch
    dict itself, its ``data_samples`` (``metainfo`` of MMEngine data elements, or dicts) and, for a
    batch that is a list of samples, each sample."""
    items: List[Any] = [batch]
    if isinstance(batch, dict):
        samples = batch.get('data_samples')
        items += list(samples) if isinstance(samples, (list, tuple)) else [samples]
    elif isinstance(batch, (list, tuple)):
        items += list(batch)
        for sample in batch:
            if isinstance(sample, dict) and sample.get('data_samples') is not None:
                items.append(sample['data_samples'])
    found: Cell = {}
    for name in names:
        values = sorted({v for item in items for v in _values(item, name)})
        if values:
            found[name] = tuple(values)
    return found


def merge(cells: Sequence[Cell]) -> Cell:
    """One optimizer step's attributes from its accumulated iterations' batches."""
    merged: Dict[str, set] = {}
    for cell in cells:
        for name, values in cell.items():
            merged.setdefault(name, set()).update(values)
    return {name: tuple(sorted(values)) for name, values in merged.items()}


def value_counts(batch: Sequence[Sequence[Cell]]) -> Dict[str, Dict[str, int]]:
    """``{attribute: {value: rank-iterations whose batch held it}}`` over every rank's record, for
    the attributes that every rank-iteration has and whose values vary (2 to ``MAX_VALUES``)."""
    cells = [cell for rank in batch for cell in rank]
    if not cells:
        return {}
    out: Dict[str, Dict[str, int]] = {}
    for name in ATTRIBUTES:
        if not all(name in cell for cell in cells):
            continue
        counts: Dict[str, int] = {}
        for cell in cells:
            for value in cell[name]:
                counts[value] = counts.get(value, 0) + 1
        if 2 <= len(counts) <= MAX_VALUES:
            out[name] = dict(sorted(counts.items()))
    return out


def probe_more(batch: Sequence[Sequence[Cell]], n_iters: int, min_seen: int,
               max_iters: int) -> Tuple[int, Optional[str]]:
    """How many iterations the probe should reach, and why: while a varying attribute has a value
    seen in fewer than ``min_seen`` rank-iterations, twice as many as now, at most ``max_iters``.
    The same answer on every rank, from every rank's record."""
    short = [(name, value, n) for name, counts in value_counts(batch).items()
             for value, n in counts.items() if n < min_seen]
    if not short or n_iters >= max_iters:
        return n_iters, None
    target = min(max_iters, 2 * n_iters)
    seen = ', '.join(f'{name}={value!r} in {n}' for name, value, n in short)
    return target, (f'batch kinds vary and some were seen in fewer than {min_seen} rank-iterations '
                    f'({seen}): probing on to {target} iterations (at most {max_iters})')


def describe(name: str, values: Sequence[str]) -> str:
    """``data_tag='sam'``, or ``data_tag in ('a', 'b')``."""
    if len(values) == 1:
        return f'{name}={values[0]!r}'
    return f'{name} in ({", ".join(repr(v) for v in values)})'


def explain(used: np.ndarray, batch: Optional[Sequence[Sequence[Cell]]],
            counted: Optional[np.ndarray] = None) -> List[Optional[str]]:
    """Per parameter, the batch attribute whose values decide its use, or None.

    ``used`` is (ranks, iterations, params), of which the rank-iterations ``counted`` (default all)
    count. A parameter is explained by an attribute when some set of its values S makes it used
    exactly in the rank-iterations whose batch holds a value of S (a mixed batch holds several).
    Parameters used always, or never, need no explanation.
    """
    out: List[Optional[str]] = [None] * used.shape[2]
    if not batch or not used.size:
        return out
    cells = [cell for rank in batch for cell in rank]
    flat = used.reshape(-1, used.shape[2])
    if len(cells) != flat.shape[0]:
        return out
    if counted is not None:
        keep = counted.reshape(-1)
        cells, flat = [c for c, k in zip(cells, keep) if k], flat[keep]
        if not cells:
            return out
    counts = value_counts([cells])
    for name in counts:
        held = [set(cell[name]) for cell in cells]
        for i in range(flat.shape[1]):
            col = flat[:, i]
            if out[i] is not None or col.all() or not col.any():
                continue
            on = set().union(*(h for h, u in zip(held, col) if u))
            off = set().union(*(h for h, u in zip(held, col) if not u))
            chosen = on - off
            if chosen and all(bool(h & chosen) == u for h, u in zip(held, col)):
                out[i] = describe(name, sorted(chosen))
    return out
