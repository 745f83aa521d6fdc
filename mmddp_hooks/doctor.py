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

from mmengine.config import Config

from .branches import standard_settings
from .model_from_config import amp_off_on_cpu, drop_remote_weights, load_config, train_only
from .plan import crash_reason
from .report import UsageReport
from .upstream_fixes import dry_run_fixes

OK, CRASHES, FAILED, HANGS = 0, 1, 2, 3


def dry_run(cfg: Config, size: Optional[Sequence[int]], iters: int, synthetic: bool = True,
            pretrained: bool = False) -> Dict[str, Any]:
    """Rewrite ``cfg`` in place for a CPU dry run of ``iters`` iterations, as every doctor run
    does: synthetic data through its pipeline (or its own), pretrained weights not on this machine
    dropped (unless ``pretrained``), AMP off without a GPU. Returns what was done (``data``,
    ``dropped_weights``, ``cpu_notes``)."""
    data = "the config's own train data"
    if synthetic:
        from .synthetic import describe, use_synthetic
        data = describe(use_synthetic(cfg, img_size=size, max_iters=iters))
    else:
        train_only(cfg, iters)
    amp = amp_off_on_cpu(cfg)
    return dict(data=data, dropped_weights=[] if pretrained else drop_remote_weights(cfg),
                cpu_notes=[amp] if amp else [])


def doctor_rank(config: str, cfg_options: Optional[dict], iters: int, size: Optional[List[int]],
                synthetic: bool, work_dir: str, trusted: Sequence[str] = (),
                hang_timeout: Optional[float] = None,
                pretrained: bool = False) -> Optional[Dict[str, Any]]:
    """One rank: train ``iters`` iterations while probing; rank 0 returns the findings."""
    import torch.distributed as dist
    from mmengine.runner import Runner

    import mmddp_hooks  # noqa: F401
    from mmddp_hooks.checkpoint import safe_checkpoint_loading, trusted_from

    cfg = load_config(config, cfg_options)
    # what MMEngine would apply to the config as written (read before the doctor rewrites it), so
    # the verdict is the real run's: e.g. a top-level find_unused_parameters beside a
    # model_wrapper_cfg without the key never reaches DDP
    settings = standard_settings(cfg)
    find_unused = bool(settings['find_unused_parameters'])
    static_graph = bool(settings['static_graph'])
    dry = dry_run(cfg, size, iters, synthetic, pretrained)
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
    from .synthetic import pipeline_errors_named
    with pipeline_errors_named(), dry_run_fixes() as fixed, \
            safe_checkpoint_loading(trusted_from(cfg, trusted)):
        runner = Runner.from_cfg(cfg)
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
                kept=kept.to_dict(), auto=auto.to_dict(), auto_summary=auto.summary(),
                upstream_bugs=fixed, **dry)


def config_lines(findings: Dict[str, Any]) -> str:
    auto = findings['auto']
    lines = ["custom_imports = dict(imports=['mmddp_hooks'], allow_failed_imports=False)",
             "model_wrapper_cfg = dict(type='ReconfigurableDDP', "
             f"find_unused_parameters={auto['find_unused_parameters']})",
             "custom_hooks = [dict(type='DDPAutoTuneHook', probe_iters=4)]"]
    return '\n'.join(lines)


# the doctor's few iterations on CPU: a stall this long (or 20x the slowest step) is a hang
HANG_MIN_TIMEOUT_S = 120.0


def _trains_at(config: str, cfg_options: Optional[dict], size: Sequence[int],
               pretrained: bool) -> Optional[str]:
    """None if the config's losses at ``size`` compute in this process (one batch, no backward:
    what a size breaks), else the error."""
    from .synthetic import local_usage

    cfg = load_config(config, cfg_options)
    dry_run(cfg, size, 1, pretrained=pretrained)
    try:
        with dry_run_fixes():
            local_usage(cfg, steps=1, backward=False)
    except Exception as err:
        first = (str(err).strip().splitlines() or ['(no message)'])[0]
        return f'{type(err).__name__}: {first[:300]}'
    return None


def size_hint(config: str, cfg_options: Optional[dict], size: Sequence[int],
              pretrained: bool = False) -> Optional[Dict[str, Any]]:
    """After a failed run at ``size``: if the model cannot run at that size at all (its losses fail
    in this process) but does at the pipeline's own, the smallest size that runs, searched by
    doubling then bisecting; else None (the size was not the cause)."""
    from .synthetic import synthetic_task, train_size

    try:
        cfg = load_config(config, cfg_options)
        shipped = train_size(cfg, synthetic_task(cfg))
    except Exception:  # a config that does not load: the ranks' errors say why
        return None
    error = _trains_at(config, cfg_options, size, pretrained)
    if error is None:
        return None
    lo = min(size[0] / shipped[0], size[1] / shipped[1])
    hi = min(1.0, 2 * lo)
    while _trains_at(config, cfg_options, [round(s * hi) for s in shipped], pretrained):
        if hi >= 1.0:
            return None  # not even at the pipeline's size: the cause is not the size
        lo, hi = hi, min(1.0, 2 * hi)
    while (hi - lo) * min(shipped) > max(16.0, 0.1 * hi * min(shipped)):
        mid = (lo + hi) / 2
        if _trains_at(config, cfg_options, [round(s * mid) for s in shipped], pretrained):
            lo = mid
        else:
            hi = mid
    smallest = [round(s * hi) for s in shipped]
    tried = [round(s * min(size[0] / shipped[0], size[1] / shipped[1])) for s in shipped]
    return dict(smallest=smallest, shipped=list(shipped), message=(
        f'the model does not train at --size {size[0]} {size[1]} (train size {tried[0]}x'
        f'{tried[1]}: {error}); the smallest size that trains is about {smallest[0]}x'
        f"{smallest[1]} (--size {smallest[0]} {smallest[1]}); the config's own train size is "
        f'{shipped[0]}x{shipped[1]}'))


def run_doctor(config: str, nproc: int = 2, iters: int = 4, size: Optional[List[int]] = None,
               cfg_options: Optional[dict] = None, synthetic: bool = True,
               timeout: float = 600.0, trusted: Sequence[str] = (),
               hang_timeout: Optional[float] = None, pretrained: bool = False) -> Dict[str, Any]:
    """Run the probe on ``nproc`` gloo ranks; ``status`` is OK, CRASHES, FAILED or HANGS.

    FAILED means a rank could not do its work; where the cause was the requested ``size``,
    ``size_hint`` says so, with the smallest size that trains. HANGS: the ranks' watchdog found
    one stalled (``hang_timeout`` seconds without progress; default: derived from the step times,
    at least ``HANG_MIN_TIMEOUT_S``), ``hang_report`` says where. A rank that finished and wrote its
    findings, then died while exiting, does not change the verdict: ``teardown_fault`` carries
    its output.
    """
    from .testing import run_on_ranks

    work_dir = tempfile.mkdtemp(prefix='ddp_doctor_')
    try:
        result = run_on_ranks(doctor_rank, nproc, timeout=timeout,
                              args=(config, cfg_options, iters, size, synthetic, work_dir,
                                    list(trusted), hang_timeout, pretrained))
        report = os.path.join(work_dir, 'hang_report.txt')
        hang_report = open(report).read() if os.path.exists(report) else None
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    if hang_report is not None and not result.work_done:
        return dict(status=HANGS, hang_report=hang_report.strip(), error=result.describe())
    if not result.work_done:
        failed = dict(status=FAILED, error=result.describe(), size_hint=None)
        if synthetic and size:
            failed['size_hint'] = size_hint(config, cfg_options, size, pretrained)
        return failed
    findings = result.ranks[0].value
    findings['status'] = CRASHES if findings['crashes'] else OK
    findings['config_lines'] = config_lines(findings)
    findings['teardown_fault'] = result.describe() if result.teardown_fault else None
    return findings
