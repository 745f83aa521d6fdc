"""Choose DDP settings from measured usage: a pure function on plain data.

The fastest correct setting, by what the probe saw:

* nothing unused: ``find_unused_parameters=False`` (no per-step graph walk, no used-map all-reduce).
* parameters never used on any rank: DDP-ignore them and keep ``False``. Under
  ``find_unused_parameters=True`` their gradients stay ``None``; ignored they stay ``None`` too, and the
  guard still sees a gradient that arrives later (they are not frozen: a call proves nothing, mmseg's
  ResNet runs stages whose output it drops).
* parameters used on some ranks only, the same ranks every iteration: keep ``False`` and, on each rank
  that does not use them, *fill* a zero gradient after backward. That is exactly what
  ``find_unused_parameters=True`` does for a locally unused parameter (its bucket slot is zero, then
  averaged), without walking the autograd graph every step. ``static_graph=True`` would also accept a
  fixed set but crashes with ``no_sync()`` on its first iteration and breaks when forward outputs are
  not all used by the loss, which MMEngine loss dicts routinely do.
* parameters used in some iterations only: ``find_unused_parameters=True``, unless the model uses
  reentrant activation checkpointing, where ``True`` raises "marked as ready twice": there the plan
  stays ``False`` and the guard completes each step as ``True`` would (see :mod:`mmddp_hooks.guard`).

With gradient accumulation, anything unused gets ``find_unused_parameters=True`` (where it can run).

Parameters kept alive by zero-weighted terms (``loss + p.sum() * 0.0``) are used as far as DDP can
tell, and the plan is made for that. Every plan then also says what the terms change (a zero
gradient is not ``None``: momentum and weight decay move an idle branch) and which plan the usage
without them gets, the one that trains as ``find_unused_parameters=True`` would.
"""
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from .report import DYNAMIC, NEVER, RANK_FIXED, UsageReport
from .text import AND_MORE, names

POLICIES = ('auto', 'keep')


@dataclass
class DDPPlan:
    find_unused_parameters: bool
    static_graph: bool = False
    ignore: List[str] = field(default_factory=list)
    fill: Dict[int, List[str]] = field(default_factory=dict)
    reasons: List[str] = field(default_factory=list)
    reentrant_checkpoint: bool = False  # find_unused_parameters=True cannot run: never switch to it

    @property
    def guarded(self) -> bool:
        """``find_unused_parameters=False`` plans are watched after each backward (static_graph,
        only ever kept from a config, handles a fixed unused set by itself)."""
        return not self.find_unused_parameters and not self.static_graph

    def to_dict(self) -> dict:
        d = asdict(self)
        d['fill'] = {str(k): v for k, v in self.fill.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> 'DDPPlan':
        d = dict(d)
        d['fill'] = {int(k): v for k, v in d.get('fill', {}).items()}
        # plans saved by 0.1 froze whole never-used modules; those parameters are ignored now
        d['ignore'] = list(d.get('ignore', [])) + list(d.pop('freeze', []))
        d.pop('watch_modules', None)
        return cls(**d)

    def summary(self) -> str:
        parts = [f'find_unused_parameters={self.find_unused_parameters}']
        if self.static_graph:
            parts.append('static_graph=True')
        if self.ignore:
            parts.append(f'ignore {len(self.ignore)} never-used params')
        n_fill = sum(len(v) for v in self.fill.values())
        if n_fill:
            parts.append(f'zero-fill {n_fill} rank-local unused params')
        return ', '.join(parts)


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f'policy must be one of {POLICIES}, got {policy!r}')


def choose_plan(report: UsageReport,
                asked_find_unused: bool = False,
                asked_static_graph: bool = False,
                policy: str = 'auto',
                grad_accumulation: bool = False,
                zero_grad_effect: Optional[str] = None) -> DDPPlan:
    """The fastest DDP setting that is still correct for the measured usage.

    Args:
        report: what the probe measured.
        asked_find_unused / asked_static_graph: what the config asked for.
        policy: 'auto' chooses; 'keep' keeps the config's settings and only explains.
        grad_accumulation: the optimizer wrapper accumulates gradients over several backwards.
        zero_grad_effect: what this run's optimizer does with a zero gradient (see
            :func:`zero_grad_effect`), for the note on zero-weighted terms.
    """
    check_policy(policy)
    where = report.where
    never = report.names_of(NEVER)
    rank_fixed = report.names_of(RANK_FIXED)
    dynamic = report.names_of(DYNAMIC)
    asked = f'the config asked find_unused_parameters={asked_find_unused}'

    auto = _auto_plan(report, never, rank_fixed, dynamic, where, grad_accumulation)
    keepalive = _keepalive_reason(report, grad_accumulation, zero_grad_effect)
    if policy == 'auto':
        if asked_find_unused and not auto.find_unused_parameters:
            auto.reasons.insert(0, f'find_unused_parameters=True was not needed: '
                                   f'{_what_was_unused(never, rank_fixed, where)}')
        auto.reasons.insert(0, asked)
        auto.reasons += keepalive
        return auto

    kept = DDPPlan(find_unused_parameters=asked_find_unused, static_graph=asked_static_graph,
                   reentrant_checkpoint=report.reentrant_checkpoint,
                   reasons=[asked, "policy='keep': the config's settings are kept"])
    if kept.find_unused_parameters != auto.find_unused_parameters or never or rank_fixed:
        kept.reasons.append(f'policy=\'auto\' would choose: {auto.summary()}')
    crash = crash_reason(report, asked_find_unused, asked_static_graph)
    if crash:
        unused = never + rank_fixed + dynamic
        detail = (f' ({len(unused)} parameters did not receive a gradient {where}, e.g. '
                  f'{names(unused, 3, AND_MORE)})' if unused and not asked_find_unused else '')
        kept.reasons.append(f'the config as written crashes under DDP: {crash}{detail}')
    kept.reasons += keepalive
    return kept


def switched_plan(plan: DDPPlan, why: str) -> DDPPlan:
    """What a guarded run switches to, on every rank at once, when usage leaves ``plan``."""
    return DDPPlan(find_unused_parameters=True,
                   reasons=plan.reasons + [f'switched to find_unused_parameters=True: {why}'])


def zero_grad_effect(optimizer: Any) -> str:
    """What ``optimizer`` does to a parameter whose gradient is zero rather than ``None``."""
    name = type(optimizer).__name__
    groups = getattr(optimizer, 'param_groups', None) or [{}]
    decay = max(float(g.get('weight_decay', 0) or 0) for g in groups)
    momentum = max(float(g.get('momentum', 0) or 0) for g in groups)
    if name == 'SGD' and not decay and not momentum:
        return (f'{name} without momentum or weight decay does not move a parameter whose '
                'gradient is zero, so here the terms cost time only')
    what = [f'momentum {momentum:g}'] if momentum else []
    if 'Adam' in name or 'betas' in groups[0]:
        what.append('its running averages')
    if decay:
        what.append(f'weight decay {decay:g}')
    return (f'{name} ({", ".join(what) or "its state"}) moves a parameter whose gradient is zero, '
            'where a None gradient is skipped: the terms change training, not only speed')


def _keepalive_reason(report: UsageReport, grad_accumulation: bool,
                      effect: Optional[str]) -> List[str]:
    """Kept-alive parameters: what the terms do, and the plan without them."""
    kept, real = report.kept_alive, report.without_keepalive
    if not kept or real is None:
        return []
    cells = report.signal_cells
    terms = sorted({t for p in kept for t in p.zero_terms})
    where = f' ({names(terms, 1, AND_MORE)})' if terms else ''
    plan = _auto_plan(real, real.names_of(NEVER), real.names_of(RANK_FIXED),
                      real.names_of(DYNAMIC), real.where, grad_accumulation)
    effect = effect or ('momentum and weight decay (SGD with momentum, Adam, AdamW) move a '
                        'parameter whose gradient is zero, where a None gradient is skipped')
    return [f'{len(kept)} parameters were kept alive by zero-weighted terms{where} in up to '
            f'{max(p.kept_alive for p in kept)} of {cells} rank-iterations '
            f'({names([p.name for p in kept], 3, AND_MORE)}): DDP counts them as used, but their gradient '
            f'there is exactly zero, not None. {effect}. Delete the terms: DDPAutoTuneHook then '
            f'plans the real usage ({real.summary_line()}): {plan.summary()}, and idle '
            'branches get None gradients, as under find_unused_parameters=True']


def crash_reason(report: UsageReport, find_unused: bool, static_graph: bool) -> Optional[str]:
    """Why plain DDP with these settings crashes on the measured usage (None: it trains)."""
    unused = report.names_of(NEVER) or report.names_of(RANK_FIXED) or report.names_of(DYNAMIC)
    if unused and not find_unused and not static_graph:
        return 'find_unused_parameters=False with unused parameters'
    if find_unused and report.reentrant_checkpoint:
        return ('find_unused_parameters=True with reentrant activation checkpointing '
                '(with_cp=True): "marked as ready twice"')
    return None


def _what_was_unused(never: List[str], rank_fixed: List[str], where: str) -> str:
    if not never and not rank_fixed:
        return f'no unused parameter {where}'
    return f'only a fixed set of parameters was unused {where}, handled without it'


def _auto_plan(report: UsageReport, never: List[str], rank_fixed: List[str],
               dynamic: List[str], where: str, grad_accumulation: bool) -> DDPPlan:
    reentrant = report.reentrant_checkpoint
    unused = len(never) + len(rank_fixed) + len(dynamic)
    if not reentrant and (dynamic or (grad_accumulation and unused)):
        why = (f'{len(dynamic)} parameters are used in some iterations only {where} '
               f'({names(dynamic, 3, AND_MORE)})' if dynamic else
               f'{unused} parameters are unused {where} and gradients are accumulated over '
               'several backwards')
        return DDPPlan(find_unused_parameters=True,
                       reasons=[f'{why}: find_unused_parameters=True is required'])
    plan = DDPPlan(find_unused_parameters=False, reentrant_checkpoint=reentrant)
    if reentrant:
        plan.reasons.append('the model uses reentrant activation checkpointing (with_cp=True / '
                            'torch.utils.checkpoint), under which find_unused_parameters=True '
                            'raises "marked as ready twice": the plan keeps False')
    if not unused:
        plan.reasons.append(f'every parameter received a gradient {where}: '
                            'find_unused_parameters=False')
    if never:
        plan.ignore = list(never)
        plan.reasons.append(f'{len(never)} parameters never received a gradient {where} '
                            f'({names(never, 3, AND_MORE)}): DDP ignores them, their gradients stay None '
                            'as under find_unused_parameters=True, and a gradient that arrives '
                            'later is averaged by the guard in its own step')
    if rank_fixed:
        plan.fill = {r: report.unused_names_on_rank(r) for r in range(report.n_ranks)}
        plan.fill = {r: names for r, names in plan.fill.items() if names}
        plan.reasons.append(f'{len(rank_fixed)} parameters are used on some ranks only, the same '
                            f'ranks every iteration ({names(rank_fixed, 3, AND_MORE)}): zero-fill their '
                            'gradients on the other ranks after backward, as '
                            'find_unused_parameters=True would, without its per-step graph walk')
    if dynamic:
        plan.reasons.append(f'{len(dynamic)} parameters are used in some iterations only {where} '
                            f'({names(dynamic, 3, AND_MORE)}): the guard completes each such iteration as '
                            'find_unused_parameters=True would')
    return plan
