"""DDPAutoTuneHook: probe the first iterations, report unused parameters by name, apply a plan."""
import json
import os.path as osp
from typing import Optional

from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from torch.nn.parallel import DistributedDataParallel

from .. import dist as ddist
from ..plan import DDPPlan, check_options, choose_plan
from ..report import UsageReport, build_report
from ..wrapper import ReconfigurableDDP

CHECKPOINT_KEY = 'mmddp_hooks'


@HOOKS.register_module()
class DDPAutoTuneHook(Hook):
    """Choose DDP's ``find_unused_parameters``/ignore/fill settings from measured usage.

    The first ``probe_iters`` training iterations run under ``find_unused_parameters=True``, whatever
    the config says, while every rank records which parameters receive a gradient. Then the ranks
    combine their records, the hook logs a table of unused parameters grouped by module, writes it as
    JSON to ``work_dir``, and every rank rebuilds DDP with the plan of
    :func:`mmddp_hooks.plan.choose_plan`. The plan is stored in checkpoints, so a resumed run applies
    it without probing again.

    A runner that wrapped the model in plain (MM)DistributedDataParallel is re-wrapped in
    :class:`ReconfigurableDDP` before training; single-process runs are left alone.

    Args:
        probe_iters: iterations to observe before choosing.
        policy: 'auto' applies the plan; 'keep' keeps the config's settings and only reports.
        unused_action: 'ignore' (DDP-ignore never-used parameters, guarded) or 'freeze' them.
        report_file: JSON file name in ``work_dir``.
    """

    priority = 'VERY_HIGH'

    def __init__(self, probe_iters: int = 4, policy: str = 'auto', unused_action: str = 'ignore',
                 report_file: str = 'ddp_usage_report.json') -> None:
        if probe_iters < 1:
            raise ValueError(f'DDPAutoTuneHook: probe_iters must be >= 1, got {probe_iters}')
        check_options(policy, unused_action)
        self.probe_iters = probe_iters
        self.policy = policy
        self.unused_action = unused_action
        self.report_file = report_file
        self._resumed_plan: Optional[DDPPlan] = None
        self.plan: Optional[DDPPlan] = None
        self.report: Optional[UsageReport] = None
        self.report_path: Optional[str] = None

    def before_run(self, runner) -> None:
        model = runner.model
        if isinstance(model, DistributedDataParallel) and not isinstance(model, ReconfigurableDDP):
            runner.logger.info(f'[mmddp_hooks] re-wrapping {type(model).__name__} in '
                               'ReconfigurableDDP (set model_wrapper_cfg=dict(type='
                               "'ReconfigurableDDP') to skip this)")
            runner.model = ReconfigurableDDP.from_ddp(model)

    def _wrapper(self, runner) -> Optional[ReconfigurableDDP]:
        model = runner.model
        return model if isinstance(model, ReconfigurableDDP) else None

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY, {}).get('plan')
        if saved:
            self._resumed_plan = DDPPlan.from_dict(saved)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.plan is not None:
            checkpoint[CHECKPOINT_KEY] = {'plan': self.plan.to_dict()}

    def before_train(self, runner) -> None:
        model = self._wrapper(runner)
        if model is None:
            runner.logger.info('[mmddp_hooks] not a distributed run: DDPAutoTuneHook does nothing')
            return
        if self._resumed_plan is not None:
            self.plan = self._resumed_plan
            runner.logger.info('[mmddp_hooks] resumed: applying the saved DDP plan '
                               f'({self.plan.summary()}) without probing')
            model.apply_plan(self.plan)
            return
        runner.logger.info(f'[mmddp_hooks] probing parameter usage for {self.probe_iters} '
                           'iterations under find_unused_parameters=True')
        model.start_probe()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        model = self._wrapper(runner)
        if model is None or model.probe is None or len(model.probe.steps) < self.probe_iters:
            return
        report = build_report(model.finish_probe())
        asked = model.config_kwargs
        plan = choose_plan(report,
                           asked_find_unused=bool(asked.get('find_unused_parameters', False)),
                           asked_static_graph=bool(asked.get('static_graph', False)),
                           policy=self.policy, unused_action=self.unused_action,
                           grad_accumulation=getattr(runner.optim_wrapper, '_accumulative_counts',
                                                     1) > 1)
        model.apply_plan(plan)
        self.plan, self.report = plan, report
        text = '\n'.join(['[mmddp_hooks] DDP usage report', report.table(),
                          f'plan: {plan.summary()}'] + [f'  - {r}' for r in plan.reasons])
        runner.logger.info(text)
        if ddist.get_rank() == 0:
            self.report_path = osp.join(runner.work_dir, self.report_file)
            with open(self.report_path, 'w') as f:
                json.dump({'iteration': runner.iter + 1, 'report': report.to_dict(),
                           'plan': plan.to_dict()}, f, indent=2)
