"""DDP doctor: probe a config on CPU gloo ranks with synthetic data and say whether DDP would crash.

Thin on purpose: it runs the real training entry (config -> Runner) for a few iterations with
:class:`DDPAutoTuneHook` under ``policy='keep'``, then asks that hook's ``choose`` (the call the hook makes
when it applies a plan) twice: what the config as written does, and what ``auto`` would choose.
Every rank also runs :class:`HangWatchdogHook` (``action='abort'``): a config whose ranks stall
gets its own verdict, HANGS, with the watchdog's report of which rank is stuck where.
"""
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence

from .branches import standard_settings
from .model_from_config import train_only
from .plan import crash_reason
from .report import UsageReport

OK, CRASHES, FAILED, HANGS = 0, 1, 2, 3


def doctor_rank(config: str, cfg_options: Optional[dict], iters: int, size: Optional[List[int]],
                synthetic: bool, work_dir: str, trusted: Sequence[str] = (),
                hang_timeout: Optional[float] = None) -> Optional[Dict[str, Any]]:
    """One rank: train ``iters`` iterations while probing; rank 0 returns the findings."""
    import torch.distributed as dist
    from mmengine.config import Config
    from mmengine.runner import Runner

    import mmddp_hooks  # noqa: F401
    from mmddp_hooks.checkpoint import safe_checkpoint_loading, trusted_from

    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    # what MMEngine would apply to the config as written (read before the doctor rewrites it), so
    # the verdict is the real run's: e.g. a top-level find_unused_parameters beside a
    # model_wrapper_cfg without the key never reaches DDP
    settings = standard_settings(cfg)
    find_unused = bool(settings['find_unused_parameters'])
    static_graph = bool(settings['static_graph'])
    if synthetic:
        from .synthetic import use_synthetic
        use_synthetic(cfg, img_size=size, max_iters=iters)
    else:
        train_only(cfg, iters)
    asked = dict(cfg.get('model_wrapper_cfg') or {})
    asked.update(type='ReconfigurableDDP', find_unused_parameters=find_unused)
    cfg.model_wrapper_cfg = asked
    own = [h for h in cfg.get('custom_hooks', []) if h.get('type') == 'DDPAutoTuneHook']
    has_hook = bool(own)
    cfg.custom_hooks = [h for h in cfg.get('custom_hooks', [])
                        if h.get('type') not in ('DDPAutoTuneHook', 'HangWatchdogHook')]
    # the config's own hook options (branches, strict, ...) shape the plan: keep them
    cfg.custom_hooks.append(dict(own[0] if own else {}, type='DDPAutoTuneHook', probe_iters=iters,
                                 policy='keep'))
    cfg.custom_hooks.append(dict(type='HangWatchdogHook', action='abort',
                                 timeout=hang_timeout or None,  # 0: the derived default
                                 min_timeout=HANG_MIN_TIMEOUT_S))
    cfg.default_hooks = dict(cfg.get('default_hooks') or {}, checkpoint=None)
    cfg.launcher = 'pytorch'
    cfg.work_dir = work_dir
    cfg.resume, cfg.load_from = False, None
    runner = Runner.from_cfg(cfg)
    with safe_checkpoint_loading(trusted_from(cfg, trusted)):
        runner.train()
    if dist.get_rank() != 0:
        return None
    tune = next(h for h in runner.hooks if type(h).__name__ == 'DDPAutoTuneHook')
    report: UsageReport = tune.report
    kept = tune.choose(runner, report, policy='keep')
    auto = tune.choose(runner, report, policy='auto')
    crash = crash_reason(report, find_unused, static_graph)
    return dict(table=report.table(), report=report.to_dict(), asked_find_unused=find_unused,
                settings=settings, dropped=settings['dropped'], has_hook=has_hook,
                crash_reason=crash, crashes=crash is not None and not has_hook,
                crashes_without_hook=crash is not None,
                kept=kept.to_dict(), auto=auto.to_dict(), auto_summary=auto.summary())


def config_lines(findings: Dict[str, Any]) -> str:
    auto = findings['auto']
    lines = ["custom_imports = dict(imports=['mmddp_hooks'], allow_failed_imports=False)",
             "model_wrapper_cfg = dict(type='ReconfigurableDDP', "
             f"find_unused_parameters={auto['find_unused_parameters']})",
             "custom_hooks = [dict(type='DDPAutoTuneHook', probe_iters=4)]"]
    return '\n'.join(lines)


# the doctor's few iterations on CPU: a stall this long (or 20x the slowest step) is a hang
HANG_MIN_TIMEOUT_S = 120.0


def run_doctor(config: str, nproc: int = 2, iters: int = 4, size: Optional[List[int]] = None,
               cfg_options: Optional[dict] = None, synthetic: bool = True,
               timeout: float = 600.0, trusted: Sequence[str] = (),
               hang_timeout: Optional[float] = None) -> Dict[str, Any]:
    """Run the probe on ``nproc`` gloo ranks; ``status`` is OK, CRASHES, FAILED or HANGS.

    FAILED means a rank could not do its work. HANGS: the ranks' watchdog found one stalled
    (``hang_timeout`` seconds without progress; default: derived from the step times, at least
    ``HANG_MIN_TIMEOUT_S``), ``hang_report`` says where. A rank that finished and wrote its
    findings, then died while exiting, does not change the verdict: ``teardown_fault`` carries
    its output.
    """
    from .testing import run_on_ranks

    work_dir = tempfile.mkdtemp(prefix='ddp_doctor_')
    try:
        result = run_on_ranks(doctor_rank, nproc, timeout=timeout,
                              args=(config, cfg_options, iters, size, synthetic, work_dir,
                                    list(trusted), hang_timeout))
        report = os.path.join(work_dir, 'hang_report.txt')
        hang_report = open(report).read() if os.path.exists(report) else None
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    if hang_report is not None and not result.work_done:
        return dict(status=HANGS, hang_report=hang_report.strip(), error=result.describe())
    if not result.work_done:
        return dict(status=FAILED, error=result.describe())
    findings = result.ranks[0].value
    findings['status'] = CRASHES if findings['crashes'] else OK
    findings['config_lines'] = config_lines(findings)
    findings['teardown_fault'] = result.describe() if result.teardown_fault else None
    return findings
