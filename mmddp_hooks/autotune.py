"""The owner of probe -> report -> plan -> apply -> switch, for one wrapped model.

:class:`DDPAutoTuneHook`, the DDP doctor and the benchmark drive the same :class:`AutoTuner`: the
hook wires the Runner's events to it, the doctor reads its report and asks it for plans, the
benchmark steps it by hand. The tuner talks to the model through :class:`TunableWrapper`, what a
wrapper kind provides (``ReconfigurableDDP`` today): rebuild itself for a plan, probe, and run the
``train_step`` seam that calls back :meth:`AutoTuner.after_step`. Plans are made in
:mod:`mmddp_hooks.plan` only.

Every method that exchanges anything is called on every rank at the same iteration (the Runner's
events are); nothing here reads a GPU.
"""
import logging
from dataclasses import dataclass
from typing import Any, List, Optional, Protocol, Sequence, Tuple

from mmengine.logging import print_log

from . import batch_kinds
from . import dist as ddist
from .plan import DDPPlan, check_policy, choose_plan, switched_plan, zero_grad_effect
from .probe import UsageProbe, ZeroTermTracer
from .report import Usage, UsageReport, build_report
from .trainable import TrainableChange, TrainableSet


class TunableWrapper(Protocol):
    """What a wrapper kind provides to the tuner (a second kind, FSDP, goes beside DDP here)."""

    plan: Optional[DDPPlan]
    probe: Optional[UsageProbe]
    guard: Any
    trainable: TrainableSet
    switch_log: List[str]
    process_group: Any
    config_kwargs: dict
    tuner: Any

    def start_probe(self) -> None: ...

    def finish_probe(self) -> Usage: ...

    def apply_plan(self, plan: DDPPlan) -> None: ...

    def refresh_buckets(self) -> None: ...


@dataclass
class ProbeSettings:
    """How long the probe runs: ``iters``, and on while a batch kind was seen in fewer than
    ``min_seen`` rank-iterations, doubling up to ``max_iters``; ``trace_zero_terms`` records the
    source line of each zero-weighted term (a Python hook on every torch call in the probe's
    forwards)."""
    iters: int = 4
    max_iters: Optional[int] = None
    min_seen: int = 3
    batch_attributes: Sequence[str] = batch_kinds.ATTRIBUTES
    trace_zero_terms: bool = False

    def __post_init__(self) -> None:
        if self.iters < 1:
            raise ValueError(f'probe_iters must be >= 1, got {self.iters}')
        self.max_iters = max(self.iters, self.max_iters or 8 * self.iters)


@dataclass
class RunFacts:
    """What the run's config and optimizer say, which the plan depends on."""
    asked_find_unused: bool = False
    asked_static_graph: bool = False
    grad_accumulation: bool = False
    zero_grad_effect: Optional[str] = None


class AutoTuner:
    """Probe, report, plan, apply; then follow usage and trainable-set changes.

    Args:
        model: the wrapper (every rank's).
        probe: how long to probe.
        policy: 'auto' applies the plan; 'keep' keeps the config's settings and only reports.
        facts: the run's config and optimizer facts (see :meth:`facts_of`).
    """

    def __init__(self, model: TunableWrapper, probe: ProbeSettings, policy: str = 'auto',
                 facts: Optional[RunFacts] = None) -> None:
        check_policy(policy)
        self.model = model
        self.settings = probe
        self.policy = policy
        self.facts = facts or RunFacts()
        self.plan: Optional[DDPPlan] = None
        self.report: Optional[UsageReport] = None
        self.probe_log: List[str] = []  # why the probe went on
        self._probe_until = probe.iters
        self._probing: Optional[UsageProbe] = None  # the probe _probe_until belongs to
        model.tuner = self

    @staticmethod
    def facts_of(model: TunableWrapper, optim_wrapper: Any) -> RunFacts:
        """The config's asked settings (the wrapper's arguments) and the optimizer's facts."""
        asked = model.config_kwargs
        optimizer = getattr(optim_wrapper, 'optimizer', None)
        return RunFacts(asked_find_unused=bool(asked.get('find_unused_parameters', False)),
                        asked_static_graph=bool(asked.get('static_graph', False)),
                        grad_accumulation=getattr(optim_wrapper, '_accumulative_counts', 1) > 1,
                        zero_grad_effect=zero_grad_effect(optimizer) if optimizer else None)

    # ------------------------------------------------------------------------------- the probe
    def start(self, resumed: Optional[DDPPlan] = None) -> None:
        """Apply a resumed run's plan, or start probing."""
        if resumed is not None:
            self.plan = resumed
            self.model.apply_plan(resumed)
        else:
            self.model.start_probe()

    @property
    def probing(self) -> bool:
        return self.model.probe is not None

    def before_iter(self) -> None:
        """Before a training iteration: trace zero-weighted terms while probing, if asked."""
        probe = self.model.probe
        if self.settings.trace_zero_terms and probe is not None:
            probe.tracer = ZeroTermTracer()
            probe.tracer.__enter__()

    def after_iter(self, batch: Any) -> Optional[Tuple[UsageReport, DDPPlan]]:
        """After a training iteration (every rank): note the batch's kind; where the probe has
        seen enough, end it and apply the plan. Returns ``(report, plan)`` in that iteration."""
        probe = self.model.probe
        if probe is not None and probe.tracer is not None:
            probe.tracer.__exit__(None, None, None)
            probe.tracer = None
        if probe is None:
            return None
        if probe is not self._probing:  # a trainable-set change restarts it
            self._probing, self._probe_until = probe, self.settings.iters
        probe.note_batch(batch, self.settings.batch_attributes)
        if len(probe.steps) < self._probe_until or self._probe_on(probe):
            return None
        report = build_report(self.model.finish_probe(), self.settings.min_seen)
        plan = self.choose(report)
        return report, plan

    def apply(self, report: UsageReport, plan: DDPPlan) -> None:
        """Rebuild the model with ``plan`` (every rank), after the caller added its notes."""
        self.model.apply_plan(plan)
        self.plan, self.report = plan, report

    def _probe_on(self, probe: UsageProbe) -> bool:
        """Every rank, same iteration: go on probing while a batch kind is rarely seen."""
        if self._probe_until >= self.settings.max_iters:
            return False
        every = ddist.all_gather_object(probe.batch, probe.group)
        until, why = batch_kinds.probe_more(every, len(probe.steps), self.settings.min_seen,
                                            self.settings.max_iters)
        if until <= len(probe.steps):
            return False
        self._probe_until = until
        self.probe_log.append(why)
        print_log(f'[mmddp_hooks] {why}', logger='current')
        return True

    def choose(self, report: UsageReport, policy: Optional[str] = None) -> DDPPlan:
        """The plan for this run's usage, config and optimizer: the one call the hook and the
        doctor both make, so the doctor prints the plan the hook applies."""
        f = self.facts
        return choose_plan(report, asked_find_unused=f.asked_find_unused,
                           asked_static_graph=f.asked_static_graph, policy=policy or self.policy,
                           grad_accumulation=f.grad_accumulation,
                           zero_grad_effect=f.zero_grad_effect)

    # ---------------------------------------------------------------------------- the switches
    def after_step(self, change: Optional[str], trainable: Optional[TrainableChange]) -> None:
        """The wrapper's ``train_step`` seam, after the optimizer step (every rank): leave a plan
        that usage left; rebuild for a changed trainable set (probing again if it was probing)."""
        if change:
            self._usage_changed(change)
        if not trainable or not self.model.trainable.change():  # rebuilt by a switch above
            return
        if self.model.probe is not None:
            print_log('[mmddp_hooks] the probe starts again: what it recorded was measured '
                      'on another trainable set', logger='current')
            self.model.start_probe()
        elif self.model.plan is not None:
            self.model.apply_plan(self.model.plan)
        else:
            self.model.refresh_buckets()

    def _usage_changed(self, why: str) -> None:
        """Every rank, same step, already fixed by the guard: leave the plan for a safe one."""
        model = self.model
        assert model.plan is not None
        if model.plan.reentrant_checkpoint:  # True cannot run: the guard keeps fixing each step
            if not model.guard.explain:  # said once: no gather, no log line on every later step
                return
            model.switch_log.append(why)
            model.guard.explain = False
            print_log(f'[mmddp_hooks] usage changed after the probe: {why}. The model uses '
                      'reentrant checkpointing, so the plan stays; the guard completes every such '
                      'step as find_unused_parameters=True would.', logger='current',
                      level=logging.WARNING)
            return
        model.switch_log.append(why)
        print_log(f'[mmddp_hooks] usage changed after the probe: {why}. Every rank switches to '
                  'find_unused_parameters=True now; pin it in model_wrapper_cfg if this is '
                  'expected.', logger='current', level=logging.WARNING)
        model.apply_plan(switched_plan(model.plan, why))
