"""DDPAutoTuneHook: probe the first iterations, report unused parameters by name, apply a plan."""
import json
import os.path as osp
from dataclasses import asdict
from typing import List, Optional, Sequence

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch.nn.parallel import DistributedDataParallel

from .. import batch_kinds, wrap_time
from .. import dist as ddist
from ..autotune import AutoTuner, ProbeSettings
from ..branches import CONFIG_KEY, Branch, parse_branches, resolve_branches, standard_settings
from ..compat import check_compile
from ..plan import DDPPlan, check_policy
from ..report import NEVER, UsageReport
from ..trainable import optimizer_params, where_now
from ..wrap_time import WrapTimeFinding
from ..wrapper import ReconfigurableDDP

CHECKPOINT_KEY = 'mmddp_hooks'


@HOOKS.register_module()
class DDPAutoTuneHook(Hook):
    """Choose DDP's ``find_unused_parameters``/ignore/fill settings from measured usage.

    The hook wires the Runner's events to an :class:`mmddp_hooks.autotune.AutoTuner`, which owns
    the pipeline: the first ``probe_iters`` training iterations train exactly as
    ``find_unused_parameters=True`` would, whatever the config says (see :mod:`mmddp_hooks.probe`),
    while every rank records which parameters receive a gradient; then the ranks combine their
    records, the plan of :func:`mmddp_hooks.plan.choose_plan` is applied, and the guard
    (:mod:`mmddp_hooks.guard`) watches it. The hook itself logs the table of unused parameters
    grouped by module, writes it as JSON to ``work_dir``, checks declared branches, and stores the
    plan in checkpoints, so a resumed run on as many ranks applies it without probing again.

    A runner that wrapped the model in plain (MM)DistributedDataParallel is re-wrapped in
    :class:`ReconfigurableDDP` before training; single-process runs are left alone.

    Args:
        probe_iters: iterations to observe before choosing.
        policy: 'auto' applies the plan; 'keep' keeps the config's settings and only reports.
        report_file: JSON file name in ``work_dir``.
        branches: config-declared branches (see :mod:`mmddp_hooks.branches`); by default the
            config's top-level ``ddp_branches``. Branches whose flag is off are frozen before the
            probe; branches whose flag is on but that never get a gradient are reported.
        strict: raise, instead of warning, when an enabled branch never reaches the loss.
        probe_max_iters: while a batch attribute (``batch_attributes``: the samples' ``data_tag``,
            dataset or task) varies and one of its values was seen in fewer than
            ``probe_min_seen`` rank-iterations, the probe goes on, doubling, up to this many
            iterations (default: 8x ``probe_iters``). The report names the attribute that explains
            iteration-dependent usage.
        trace_zero_terms: record the source line of each zero-weighted term (``x * 0.0``) during
            the probe (a Python hook on every torch call in the probe's forwards: the DDP doctor
            turns it on). Kept-alive parameters are found without it, named by module.
    """

    priority = 'VERY_HIGH'

    def __init__(self, probe_iters: int = 4, policy: str = 'auto',
                 report_file: str = 'ddp_usage_report.json', branches: Optional[dict] = None,
                 strict: bool = False, probe_max_iters: Optional[int] = None,
                 probe_min_seen: int = 3,
                 batch_attributes: Sequence[str] = batch_kinds.ATTRIBUTES,
                 trace_zero_terms: bool = False) -> None:
        try:
            self.probe_settings = ProbeSettings(probe_iters, probe_max_iters, probe_min_seen,
                                       tuple(batch_attributes), trace_zero_terms)
        except ValueError as e:
            raise ValueError(f'DDPAutoTuneHook: {e}') from None
        check_policy(policy)
        self.policy = policy
        self.tuner: Optional[AutoTuner] = None  # made in before_train, for the wrapped model
        self.report_file = report_file
        self.branches_declared = branches
        self.strict = strict
        self.branches: List[Branch] = []
        self._resumed_plan: Optional[DDPPlan] = None
        self.plan: Optional[DDPPlan] = None
        self.report: Optional[UsageReport] = None
        self.report_path: Optional[str] = None
        self._changes_seen = 0  # trainable-set changes whose optimizer membership was checked
        self.wrap_time: Optional[WrapTimeFinding] = None  # requires_grad changed after the wrap

    def before_run(self, runner) -> None:
        check_compile(runner.cfg.get('compile'))
        for note in standard_settings(runner.cfg)['dropped']:  # the run does not see these keys
            runner.logger.warning(f'[mmddp_hooks] {note}')
        model = runner.model
        if isinstance(model, DistributedDataParallel) and not isinstance(model, ReconfigurableDDP):
            runner.logger.info(f'[mmddp_hooks] re-wrapping {type(model).__name__} in '
                               'ReconfigurableDDP (set model_wrapper_cfg=dict(type='
                               "'ReconfigurableDDP') to skip this)")
            runner.model = ReconfigurableDDP.from_ddp(model)
        declared = self.branches_declared or runner.cfg.get(CONFIG_KEY)
        module = runner.model.module if is_model_wrapper(runner.model) else runner.model
        self.branches = resolve_branches(parse_branches(declared, runner.cfg), module)
        wrap_time.watch(runner)

    def _freeze_switched_off(self, runner, model: ReconfigurableDDP) -> None:
        """Freeze what the config switched off, so DDP never waits for it and no search is needed."""
        named = dict(model.module.named_parameters())
        for b in self.branches:
            if b.enabled or not b.resolved:
                continue
            for n in b.resolved:
                named[n].requires_grad_(False)
            elems = sum(named[n].numel() for n in b.resolved)
            runner.logger.info(f'[mmddp_hooks] branch {b.name} switched off by '
                               f'{b.describe_flag()}: froze {len(b.resolved)} params '
                               f'({elems} elems) before DDP')

    def _wrapper(self, runner) -> Optional[ReconfigurableDDP]:
        model = runner.model
        return model if isinstance(model, ReconfigurableDDP) else None

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Keep the saved plan for a resumed run of the same world size; anything else probes.

        ``load_from`` (fine-tuning) starts a new run whose model use may differ, and a plan's
        per-rank zero-fill lists belong to the world size that measured them.
        """
        saved = checkpoint.get(CHECKPOINT_KEY, {})
        if not saved.get('plan'):
            return
        why, ranks = None, self._ranks(runner)
        if not getattr(runner, '_resume', False):
            why = 'load_from starts a new run'
        elif saved.get('world_size') != ranks:
            why = (f"it was measured on {saved.get('world_size', 'an unknown number of')} ranks, "
                   f'this run has {ranks}')
        if why is None:
            self._resumed_plan = DDPPlan.from_dict(saved['plan'])
        else:
            runner.logger.info(f"[mmddp_hooks] the checkpoint's DDP plan is not applied ({why}): "
                               'probing again')

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        model = self._wrapper(runner)
        plan = model.plan if model is not None else None  # after a guard switch: the safe plan
        if plan is not None:
            checkpoint[CHECKPOINT_KEY] = {'plan': plan.to_dict(),
                                          'world_size': self._ranks(runner)}

    def _ranks(self, runner) -> int:
        """Ranks of the DDP wrapper's group: what a plan's per-rank lists are indexed by."""
        return ddist.group_size(getattr(runner.model, 'process_group', None))

    def before_train(self, runner) -> None:
        model = self._wrapper(runner)
        if model is None:
            runner.logger.info('[mmddp_hooks] not a distributed run: DDPAutoTuneHook does nothing')
            return
        self._freeze_switched_off(runner, model)
        self.tuner = AutoTuner(model, self.probe_settings, self.policy,
                               AutoTuner.facts_of(model, runner.optim_wrapper))
        if self._resumed_plan is not None:
            self.plan = self._resumed_plan
            runner.logger.info('[mmddp_hooks] resumed: applying the saved DDP plan '
                               f'({self.plan.summary()}) without probing')
        else:
            runner.logger.info(f'[mmddp_hooks] probing parameter usage for {self.probe_settings.iters} '
                               'iterations (each trained as find_unused_parameters=True would)')
        self.tuner.start(self._resumed_plan)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self.wrap_time = wrap_time.finish(runner) or self.wrap_time
        if self.tuner is not None:
            self.tuner.before_iter()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        model = self._wrapper(runner)
        if model is None or self.tuner is None:
            return
        if len(model.trainable_changes) > self._changes_seen:
            self._check_optimizer_holds(runner, model)
        done = self.tuner.after_iter(data_batch)
        if done is None:
            return
        report, plan = done
        branch_notes = self._check_enabled_branches(report)
        plan.reasons.extend(branch_notes)
        self.tuner.apply(report, plan)
        self.plan, self.report = plan, report
        found = self.wrap_time.lines() if self.wrap_time else []
        text = '\n'.join(['[mmddp_hooks] DDP usage report'] + found + [report.table(),
                          f'plan: {plan.summary()}'] + [f'  - {r}' for r in plan.reasons])
        runner.logger.info(text)
        if ddist.get_rank() == 0:
            self.report_path = osp.join(runner.work_dir, self.report_file)
            with open(self.report_path, 'w') as f:
                json.dump({'iteration': runner.iter + 1, 'report': report.to_dict(),
                           'plan': plan.to_dict(), 'config': standard_settings(runner.cfg),
                           'probe_log': self.probe_log,
                           'wrap_time': self.wrap_time.to_dict() if self.wrap_time else None,
                           'branches': [asdict(b) for b in self.branches]}, f, indent=2)
        for note in branch_notes:
            if self.strict:
                raise RuntimeError(f'[mmddp_hooks] strict: {note}')
            runner.logger.warning(f'[mmddp_hooks] {note}')

    @property
    def probe_log(self) -> List[str]:
        """Why the probe went on (batch kinds rarely seen)."""
        return self.tuner.probe_log if self.tuner is not None else []

    def _check_optimizer_holds(self, runner, model: ReconfigurableDDP) -> None:
        """An unfrozen parameter the optimizer does not hold would be averaged but never updated:
        stop, naming it (TrainableScheduleHook builds the optimizer with what it unfreezes)."""
        new, self._changes_seen = model.trainable_changes[self._changes_seen:], \
            len(model.trainable_changes)
        named = dict(model.module.named_parameters())
        held = optimizer_params(runner.optim_wrapper)
        missing = [n for c in new for n in c.unfrozen if id(named[n]) not in held]
        if missing:
            raise RuntimeError(
                f'[mmddp_hooks] {len(missing)} parameters were unfrozen{where_now()} but the '
                f'optimizer does not hold them ({", ".join(missing[:6])}'
                f'{" ..." if len(missing) > 6 else ""}): they would be averaged and never updated. '
                "MMEngine's constructor with a paramwise_cfg skips parameters that do not require "
                'grad when it builds the optimizer. Unfreeze them with TrainableScheduleHook, which '
                'builds the optimizer with them, or have them require grad when it is built.')

    def after_run(self, runner) -> None:
        """Remove the guard's hooks from the model (the run is over)."""
        model = self._wrapper(runner)
        if model is not None:
            model.close_guard()

    def _check_enabled_branches(self, report: UsageReport) -> List[str]:
        """Enabled branches none of whose parameters got a gradient: likely bugs."""
        never = set(report.names_of(NEVER))
        return [f'branch {b.name} is enabled by {b.describe_flag()} but never reached the loss '
                f'{report.where} ({len(b.resolved)} params, e.g. {b.resolved[0]})'
                for b in self.branches if b.enabled and b.resolved and set(b.resolved) <= never]
