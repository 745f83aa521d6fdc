"""A freeze/unfreeze schedule from a config, checked against the built model before training.

::

    schedule=[dict(at=1000, unfreeze=['backbone.layer4.*']),
              dict(at_epoch=2, freeze=['auxiliary_head.*'])]

``at=N`` applies before iteration ``N + 1`` (MMEngine's ``runner.iter == N``); ``at_epoch=E`` before
the first iteration of epoch ``E + 1`` (``runner.epoch == E``). Patterns are ``fnmatch`` globs over
parameter names. Every check names the entry (``schedule[i]``) and the key.
"""
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Dict, List, Optional, Sequence, Set

from torch import nn

from . import text

_KEYS = ('at', 'at_epoch', 'freeze', 'unfreeze')


class ScheduleError(ValueError):
    """A schedule entry that cannot be right: the message names it."""


@dataclass
class ScheduleEntry:
    index: int
    at: Optional[int] = None
    at_epoch: Optional[int] = None
    freeze: List[str] = field(default_factory=list)     # globs, as written
    unfreeze: List[str] = field(default_factory=list)
    frozen: List[str] = field(default_factory=list)     # parameter names, once resolved
    unfrozen: List[str] = field(default_factory=list)
    start: Optional[int] = None  # the iteration it applies before, once the loop is known

    @property
    def when(self) -> str:
        return f'at={self.at}' if self.at is not None else f'at_epoch={self.at_epoch}'

    def label(self) -> str:
        return f'schedule[{self.index}] ({self.when})'

    def due(self, iteration: int, epoch: int) -> bool:
        return (self.at is not None and iteration >= self.at) or \
            (self.at_epoch is not None and epoch >= self.at_epoch)


def _globs(entry: Dict[str, Any], key: str, label: str) -> List[str]:
    value = entry.get(key, [])
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, (list, tuple)) or not all(isinstance(g, str) for g in value):
        raise ScheduleError(f'{label}.{key} must be a glob or a list of globs over parameter '
                            f'names, got {value!r}')
    return list(value)


def parse_schedule(schedule: Any) -> List[ScheduleEntry]:
    """Plain checks on the config's list (no model needed)."""
    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise ScheduleError('TrainableScheduleHook: schedule must be a non-empty list of '
                            "dict(at=ITER or at_epoch=EPOCH, freeze=[...], unfreeze=[...]), got "
                            f'{schedule!r}')
    entries = []
    for i, raw in enumerate(schedule):
        label = f'schedule[{i}]'
        if not isinstance(raw, dict):
            raise ScheduleError(f'{label} must be a dict, got {raw!r}')
        unknown = sorted(set(raw) - set(_KEYS))
        if unknown:
            raise ScheduleError(f'{label} has unknown keys {unknown} (allowed: {list(_KEYS)})')
        times = [k for k in ('at', 'at_epoch') if raw.get(k) is not None]
        if len(times) != 1:
            raise ScheduleError(f'{label} needs exactly one of at=ITER or at_epoch=EPOCH, got '
                                f'{times or "neither"}')
        t = raw[times[0]]
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ScheduleError(f'{label}.{times[0]} must be an int >= 0, got {t!r}')
        entry = ScheduleEntry(i, **{times[0]: t}, freeze=_globs(raw, 'freeze', label),
                              unfreeze=_globs(raw, 'unfreeze', label))
        if not entry.freeze and not entry.unfreeze:
            raise ScheduleError(f'{label} freezes and unfreezes nothing: give freeze=[...] or '
                                'unfreeze=[...]')
        entries.append(entry)
    return entries


def resolve_schedule(entries: Sequence[ScheduleEntry], module: nn.Module,
                     iters_per_epoch: Optional[int] = None) -> None:
    """Match each entry's globs on the model; a glob matching nothing, an entry that freezes and
    unfreezes one parameter, or two entries at the same time point that disagree are errors.
    ``iters_per_epoch`` (an epoch-based loop's) places ``at_epoch`` entries among ``at`` ones."""
    names = [n for n, _ in module.named_parameters()]
    for e in entries:
        e.start = e.at if e.at is not None else (
            e.at_epoch * iters_per_epoch if iters_per_epoch is not None else None)
        for key, out in (('freeze', e.frozen), ('unfreeze', e.unfrozen)):
            for glob in getattr(e, key):
                hits = [n for n in names if fnmatchcase(n, glob)]
                if not hits:
                    raise ScheduleError(f'{e.label()}.{key}: {glob!r} matches no parameter of '
                                        f'{type(module).__name__} (e.g. {text.names(names, 4, "")})')
                out.extend(n for n in hits if n not in out)
        both = sorted(set(e.frozen) & set(e.unfrozen))
        if both:
            raise ScheduleError(f'{e.label()} both freezes and unfreezes {both[:4]}')
    for i, a in enumerate(entries):
        for b in entries[i + 1:]:
            same = a.start == b.start if None not in (a.start, b.start) else \
                (a.at, a.at_epoch) == (b.at, b.at_epoch)
            if not same:
                continue
            clash = sorted((set(a.frozen) & set(b.unfrozen)) | (set(a.unfrozen) & set(b.frozen)))
            if clash:
                raise ScheduleError(f'{a.label()} and {b.label()} apply at the same time and '
                                    f'disagree on {clash[:4]}')


def due_in_order(entries: Sequence[ScheduleEntry], applied: Set[int], iteration: int,
                 epoch: int) -> List[ScheduleEntry]:
    """The entries not applied yet that are due, in time order (list order where tied): a resumed
    run applies what it missed as the uninterrupted run did."""
    due = [e for e in entries if e.index not in applied and e.due(iteration, epoch)]
    return sorted(due, key=lambda e: (e.start if e.start is not None else -1, e.index))


def scheduled_unfreezes(entries: Sequence[ScheduleEntry]) -> List[str]:
    """Every parameter some entry unfreezes, in schedule order."""
    out: List[str] = []
    for e in entries:
        out.extend(n for n in e.unfrozen if n not in out)
    return out
