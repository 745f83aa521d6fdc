"""Choose DDP settings from measured usage: a pure function on plain data.

The fastest correct setting, by what the probe saw:

* nothing unused: ``find_unused_parameters=False`` (no per-step graph walk, no used-map all-reduce).
* parameters never used on any rank: DDP-ignore them (or freeze them) and keep ``False``. Under
  ``find_unused_parameters=True`` their gradients stay ``None``; ignored or frozen they stay ``None`` too.
* parameters used on some ranks only, the same ranks every iteration: keep ``False`` and, on each rank
  that does not use them, *fill* a zero gradient after backward. That is exactly what
  ``find_unused_parameters=True`` does for a locally unused parameter (its bucket slot is zero, then
  averaged), without walking the autograd graph every step. ``static_graph=True`` would also accept a
  fixed set but crashes with ``no_sync()`` on its first iteration and breaks when forward outputs are
  not all used by the loss, which MMEngine loss dicts routinely do.
* parameters used in some iterations only: ``find_unused_parameters=True`` is required.

Filling relies on gradients being ``None`` at the start of a synchronising backward, which gradient
accumulation breaks; with accumulation, anything unused needs ``find_unused_parameters=True``.
"""
from dataclasses import asdict, dataclass, field
from typing import Collection, Dict, List, Optional

from .report import DYNAMIC, NEVER, RANK_FIXED, UsageReport

POLICIES = ('auto', 'keep')
UNUSED_ACTIONS = ('auto', 'ignore', 'freeze')


@dataclass
class DDPPlan:
    find_unused_parameters: bool
    static_graph: bool = False
    ignore: List[str] = field(default_factory=list)
    freeze: List[str] = field(default_factory=list)
    fill: Dict[int, List[str]] = field(default_factory=dict)
    reasons: List[str] = field(default_factory=list)
    watch_modules: List[str] = field(default_factory=list)  # frozen modules whose call = wake-up

    @property
    def guarded(self) -> bool:
        """Plans that DDP alone would crash on, if usage changed, are watched after each backward."""
        return not self.find_unused_parameters

    def to_dict(self) -> dict:
        d = asdict(self)
        d['fill'] = {str(k): v for k, v in self.fill.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> 'DDPPlan':
        d = dict(d)
        d['fill'] = {int(k): v for k, v in d.get('fill', {}).items()}
        return cls(**d)

    def summary(self) -> str:
        parts = [f'find_unused_parameters={self.find_unused_parameters}']
        if self.static_graph:
            parts.append('static_graph=True')
        if self.ignore:
            parts.append(f'ignore {len(self.ignore)} never-used params')
        if self.freeze:
            parts.append(f'freeze {len(self.freeze)} never-used params')
        n_fill = sum(len(v) for v in self.fill.values())
        if n_fill:
            parts.append(f'zero-fill {n_fill} rank-local unused params')
        return ', '.join(parts)


def _examples(names: List[str], n: int = 3) -> str:
    shown = ', '.join(names[:n])
    return shown + (f' and {len(names) - n} more' if len(names) > n else '')


def check_options(policy: str, unused_action: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f'policy must be one of {POLICIES}, got {policy!r}')
    if unused_action not in UNUSED_ACTIONS:
        raise ValueError(f'unused_action must be one of {UNUSED_ACTIONS}, got {unused_action!r}')


def choose_plan(report: UsageReport,
                asked_find_unused: bool = False,
                asked_static_graph: bool = False,
                policy: str = 'auto',
                unused_action: str = 'auto',
                grad_accumulation: bool = False,
                module_names: Optional[Collection[str]] = None) -> DDPPlan:
    """The fastest DDP setting that is still correct for the measured usage.

    Args:
        report: what the probe measured.
        asked_find_unused / asked_static_graph: what the config asked for.
        policy: 'auto' chooses; 'keep' keeps the config's settings and only explains.
        unused_action: what to do with never-used parameters: 'auto', DDP-'ignore' them (a guard
            watches their gradients) or 'freeze' them (``requires_grad=False``).
        grad_accumulation: the optimizer wrapper accumulates gradients over several backwards.
        module_names: the model's module names. With ``unused_action='auto'``, never-used
            parameters that make up whole modules are frozen (a call of the module, watched by a
            forward pre-hook that costs nothing until it fires, means it woke up); the rest are
            DDP-ignored (watched by gradient hooks, which needs a per-step flag exchange).
    """
    check_options(policy, unused_action)
    where = report.where
    never = report.names_of(NEVER)
    rank_fixed = report.names_of(RANK_FIXED)
    dynamic = report.names_of(DYNAMIC)
    asked = f'the config asked find_unused_parameters={asked_find_unused}'

    auto = _auto_plan(report, never, rank_fixed, dynamic, where, unused_action, grad_accumulation,
                      set(module_names or ()))
    if policy == 'auto':
        if asked_find_unused and not auto.find_unused_parameters:
            auto.reasons.insert(0, f'find_unused_parameters=True was not needed: '
                                   f'{_what_was_unused(never, rank_fixed, where)}')
        auto.reasons.insert(0, asked)
        return auto

    kept = DDPPlan(find_unused_parameters=asked_find_unused, static_graph=asked_static_graph,
                   reasons=[asked, "policy='keep': the config's settings are kept"])
    if kept.find_unused_parameters != auto.find_unused_parameters or never or rank_fixed:
        kept.reasons.append(f'policy=\'auto\' would choose: {auto.summary()}')
    if not asked_find_unused and not asked_static_graph and (never or rank_fixed or dynamic):
        kept.reasons.append('the config as written crashes under DDP: '
                            f'{len(never) + len(rank_fixed) + len(dynamic)} parameters did not '
                            f'receive a gradient {where}, e.g. '
                            f'{_examples(never + rank_fixed + dynamic)}')
    return kept


def _what_was_unused(never: List[str], rank_fixed: List[str], where: str) -> str:
    if not never and not rank_fixed:
        return f'no unused parameter {where}'
    return f'only a fixed set of parameters was unused {where}, handled without it'


def _auto_plan(report: UsageReport, never: List[str], rank_fixed: List[str],
               dynamic: List[str], where: str, unused_action: str,
               grad_accumulation: bool, module_names: set) -> DDPPlan:
    if dynamic:
        return DDPPlan(find_unused_parameters=True, reasons=[
            f'{len(dynamic)} parameters are used in some iterations only {where} '
            f'({_examples(dynamic)}): find_unused_parameters=True is required'])
    if grad_accumulation and (never or rank_fixed):
        return DDPPlan(find_unused_parameters=True, reasons=[
            f'{len(never) + len(rank_fixed)} parameters are unused {where} and gradients are '
            'accumulated over several backwards: find_unused_parameters=True is required'])
    plan = DDPPlan(find_unused_parameters=False)
    if not never and not rank_fixed:
        plan.reasons.append(f'every parameter received a gradient {where}: '
                            'find_unused_parameters=False')
    if never:
        whole = [g for g in report.groups if g.kind == NEVER and g.prefix in module_names]
        if unused_action != 'ignore':
            plan.watch_modules = [g.prefix for g in whole]
        in_modules = {n for g in whole for n in g.names}
        for name in never:
            frozen = unused_action == 'freeze' or (unused_action == 'auto' and name in in_modules)
            (plan.freeze if frozen else plan.ignore).append(name)
        what = ' and '.join(f'{verb} {len(names)}' for verb, names in (('freeze', plan.freeze),
                                                                       ('ignore', plan.ignore))
                            if names)
        plan.reasons.append(f'{len(never)} parameters never received a gradient {where} '
                            f'({_examples(never)}): {what} of them, their gradients stay None '
                            'as under find_unused_parameters=True')
    if rank_fixed:
        plan.fill = {r: report.unused_names_on_rank(r) for r in range(report.n_ranks)}
        plan.fill = {r: names for r, names in plan.fill.items() if names}
        plan.reasons.append(f'{len(rank_fixed)} parameters are used on some ranks only, the same '
                            f'ranks every iteration ({_examples(rank_fixed)}): zero-fill their '
                            'gradients on the other ranks after backward, as '
                            'find_unused_parameters=True would, without its per-step graph walk')
    return plan

