"""DDP doctor: probe a config on CPU gloo ranks with synthetic data and say whether DDP would crash.

Thin on purpose: it runs the real training entry (config -> Runner) for a few iterations with
:class:`DDPAutoTuneHook` under ``policy='keep'``, then asks that hook's tuner for a plan (the
:meth:`mmddp_hooks.autotune.AutoTuner.choose` the hook applies) twice: what the config as written
does, and what ``auto`` would choose.
Every rank also runs :class:`HangWatchdogHook` (``action='abort'``): a config whose ranks stall
gets its own verdict, HANGS, with the watchdog's report of which rank is stuck where.
"""
import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mmengine.config import Config
from mmengine.hooks import Hook

from .branches import standard_settings
from .doctor_failure import (
    DATA,
    LOADING,
    LOST_PEER,
    MODEL,
    PEER_LOST,
    RUNNING,
    STARTING,
    cause_line,
    classify,
    first_failure,
)
from .doctor_failure import paragraph as failure_paragraph
from .model_from_config import (
    amp_off_on_cpu,
    drop_remote_weights,
    load_config,
    take_subset,
    train_only,
    type_name,
)
from .plan import crash_reason
from .rank_memory import killed, watch_memory
from .report import UsageReport
from .upstream_fixes import dry_run_fixes
from .wrap_time import is_lazy, wrapper_lines

OK, CRASHES, FAILED, HANGS = 0, 1, 2, 3
VERDICTS = {OK: 'trains under DDP', CRASHES: 'crashes under DDP', FAILED: 'could not run',
            HANGS: 'hangs under DDP'}
BATCH_SIZE = 2  # per rank, on CPU, unless the user sets one
# hooks that cannot run in a few iterations and change no parameter's gradient: left out, named
DRY_RUN_SKIPPED = {
    'PreciseBNHook': "recomputes BatchNorm statistics from extra train batches at an epoch's end, "
                     'which a dry run of a few iterations does not have (StopIteration); it '
                     "changes no parameter's gradient"}


def _set_batch_size(cfg: Config, batch_size: Optional[int]) -> Tuple[Optional[str], bool]:
    """The train loader's per-rank batch for the dry run, and what the report says of it: by
    default (None) the config's own, at most ``BATCH_SIZE`` (never raised: a batch a model was not
    written for can fail in its own code); 0 keeps the config's; N sets N. Also whether it was
    changed."""
    loader = cfg.get('train_dataloader') or {}
    own = loader.get('batch_size')
    if own is None:
        return None, False
    chosen = own if batch_size == 0 else batch_size or min(own, BATCH_SIZE)
    loader['batch_size'] = chosen
    if chosen == own:
        return f"per-rank batch {own} (the config's)", False
    if batch_size:
        return f"per-rank batch {chosen} (--batch-size; the config's is {own})", True
    return (f"per-rank batch {chosen} (lowered from the config's {own}; --batch-size N sets "
            "another, --batch-size 0 keeps the config's)"), True


def _skip_dry_run_hooks(cfg: Config) -> List[str]:
    """Leave out the hooks of ``DRY_RUN_SKIPPED``; what was left out, and why."""
    hooks = cfg.get('custom_hooks') or []
    skipped = [h for h in hooks if type_name(h) in DRY_RUN_SKIPPED]
    if skipped:
        cfg.custom_hooks = [h for h in hooks if h not in skipped]
    return [f'{type_name(h)} left out: it {DRY_RUN_SKIPPED[type_name(h)]}' for h in skipped]


def dry_run(cfg: Config, size: Optional[Sequence[int]], iters: int, synthetic: bool = True,
            pretrained: bool = False, batch_size: Optional[int] = None,
            subset: Optional[int] = None) -> Dict[str, Any]:
    """Rewrite ``cfg`` in place for a CPU dry run of ``iters`` iterations, as every doctor run
    does: synthetic data through its pipeline (or the config's ``ddp_doctor.synthetic_batch``, or
    the first ``subset`` samples of its own data), a small per-rank batch (``batch_size``: see
    :func:`_set_batch_size`), pretrained weights not on this machine dropped (unless
    ``pretrained``), AMP off without a GPU, hooks that cannot run in a dry run left out. Returns
    what was done (``data``, ``batch``, ``batch_changed``, ``dropped_weights``, ``cpu_notes``)."""
    batch, changed = _set_batch_size(cfg, batch_size)  # first: a batch builder takes the loader's
    builder = (cfg.get('ddp_doctor') or {}).get('synthetic_batch')
    if synthetic and builder:
        from .synthetic import use_batch_builder
        data = use_batch_builder(cfg, builder, iters)
    elif synthetic:
        from .synthetic import describe, use_synthetic
        data = describe(use_synthetic(cfg, img_size=size, max_iters=iters))
    else:
        train_only(cfg, iters)
        data = "the config's own train data" + (f', {take_subset(cfg, subset)}' if subset else '')
    amp = amp_off_on_cpu(cfg)
    return dict(data=data, batch=batch, batch_changed=changed,
                dropped_weights=[] if pretrained else drop_remote_weights(cfg),
                cpu_notes=([amp] if amp else []) + _skip_dry_run_hooks(cfg))


class _DoctorHook(Hook):
    """Tells the doctor how far a rank got, and ends training when the probe has reported:
    iterations go on (one at a time) while DDPAutoTuneHook probes on (batch kinds rarely seen)."""

    priority = 'LOWEST'

    def __init__(self, state: Dict[str, Any], tune: Hook) -> None:
        self.state, self.tune = state, tune

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self.state['stage'] != RUNNING:
            _stage(self.state, RUNNING)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        loop = runner.train_loop
        if self.tune.report is not None:
            loop.stop_training = True
        elif runner.iter + 1 >= loop.max_iters:
            loop._max_iters += 1


def _stage(state: Dict[str, Any], stage: str) -> None:
    """How far this rank got, written at once for a rank the kernel may kill next."""
    state['stage'] = stage
    state['note']()


def doctor_rank(config: str, cfg_options: Optional[dict], iters: int, size: Optional[List[int]],
                synthetic: bool, work_dir: str, trusted: Sequence[str] = (),
                hang_timeout: Optional[float] = None, pretrained: bool = False,
                batch_size: Optional[int] = None,
                subset: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """One rank: train while probing; rank 0 returns the findings. A rank that fails leaves its
    failure, classified (:func:`mmddp_hooks.doctor_failure.classify`), in ``work_dir``; every rank
    leaves the memory it holds there, for a rank the kernel kills."""
    import torch.distributed as dist

    rank = dist.get_rank()
    state: Dict[str, Any] = dict(stage=LOADING, cfg=None)
    state['note'] = watch_memory(os.path.join(work_dir, f'memory_rank{rank}'),
                                 lambda: state['stage'])
    try:
        return _doctor_rank(state, config, cfg_options, iters, size, synthetic, work_dir,
                            trusted, hang_timeout, pretrained, batch_size, subset)
    except BaseException as err:
        failure = classify(err, state['stage'], config, state['cfg'], real_data=not synthetic,
                           rank=rank)
        with open(os.path.join(work_dir, f'failure_rank{rank}.json'), 'w') as f:
            json.dump(failure, f)
        raise


def _doctor_rank(state: Dict[str, Any], config: str, cfg_options: Optional[dict], iters: int,
                 size: Optional[List[int]], synthetic: bool, work_dir: str, trusted: Sequence[str],
                 hang_timeout: Optional[float], pretrained: bool, batch_size: Optional[int],
                 subset: Optional[int]) -> Optional[Dict[str, Any]]:
    import torch.distributed as dist
    from mmengine.runner import Runner

    import mmddp_hooks  # noqa: F401
    from mmddp_hooks.checkpoint import safe_checkpoint_loading, trusted_from

    cfg = state['cfg'] = load_config(config, cfg_options)
    # what MMEngine would apply to the config as written (read before the doctor rewrites it), so
    # the verdict is the real run's: e.g. a top-level find_unused_parameters beside a
    # model_wrapper_cfg without the key never reaches DDP
    settings = standard_settings(cfg)
    find_unused = bool(settings['find_unused_parameters'])
    static_graph = bool(settings['static_graph'])
    if cfg_options and 'train_dataloader.batch_size' in cfg_options:
        batch_size = 0  # the user's own
    dry = dry_run(cfg, size, iters, synthetic, pretrained, batch_size, subset)
    asked = dict(cfg.get('model_wrapper_cfg') or {})
    asked.update(type='ReconfigurableDDP', find_unused_parameters=find_unused)
    cfg.model_wrapper_cfg = asked
    own = [h for h in cfg.get('custom_hooks', []) if type_name(h) == 'DDPAutoTuneHook']
    has_hook = bool(own)
    cfg.custom_hooks = [h for h in cfg.get('custom_hooks', [])
                        if type_name(h) not in ('DDPAutoTuneHook', 'HangWatchdogHook')]
    # the config's own hook options (branches, strict, ...) shape the plan: keep them
    cfg.custom_hooks.append(dict(own[0] if own else {}, type='DDPAutoTuneHook', probe_iters=iters,
                                 policy='keep', trace_zero_terms=True))
    cfg.custom_hooks.append(dict(type='HangWatchdogHook', action='abort',
                                 timeout=hang_timeout or None,  # 0: the derived default
                                 min_timeout=HANG_MIN_TIMEOUT_S))
    cfg.default_hooks = dict(cfg.get('default_hooks') or {}, checkpoint=None)
    cfg.launcher = 'pytorch'
    if cfg.get('env_cfg') is None:  # mmengine < 0.10 has no default for it; the group is gloo's
        cfg.env_cfg = dict(dist_cfg=dict(backend='gloo'))
    cfg.work_dir = work_dir
    cfg.resume, cfg.load_from = False, None
    from .synthetic import pipeline_errors_named
    _stage(state, MODEL)
    with pipeline_errors_named(synthetic), dry_run_fixes() as fixed, \
            safe_checkpoint_loading(trusted_from(cfg, trusted)):
        runner = Runner.from_cfg(cfg)
        tune = next(h for h in runner.hooks if type(h).__name__ == 'DDPAutoTuneHook')
        runner.register_hook(_DoctorHook(state, tune))
        _stage(state, DATA)  # the train loop builds the loader first
        runner.train()
    if dist.get_rank() != 0:
        return None
    report: UsageReport = tune.report
    kept = tune.tuner.choose(report, policy='keep')
    auto = tune.tuner.choose(report, policy='auto')
    late = tune.wrap_time  # plain DDP registers the flags of the wrap: judged on those first
    crash = (late.crash_reason(find_unused, static_graph) if late else None) or \
        crash_reason(report, find_unused, static_graph)
    if late:
        auto.reasons = late.qualify(auto.reasons)
    return dict(wrap_time=late.to_dict() if late else None,
                wrap_time_text='\n'.join(late.lines()) if late else None, table=report.table(),
                report=report.to_dict(), asked_find_unused=find_unused,
                settings=settings, dropped=settings['dropped'], has_hook=has_hook,
                crash_reason=crash, crashes=crash is not None and not has_hook,
                crashes_without_hook=crash is not None, probe_log=list(tune.probe_log),
                kept=kept.to_dict(), auto=auto.to_dict(), auto_summary=auto.summary(),
                upstream_bugs=fixed, **dry)


def config_lines(findings: Dict[str, Any], lazy: bool = False) -> str:
    """What to paste into the config: its imports as a new-style (``lazy``) config has them."""
    return wrapper_lines(findings['auto']['find_unused_parameters'], lazy)


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
               hang_timeout: Optional[float] = None, pretrained: bool = False,
               batch_size: Optional[int] = None,
               subset: Optional[int] = None) -> Dict[str, Any]:
    """Run the probe on ``nproc`` gloo ranks; ``status`` is OK, CRASHES, FAILED or HANGS.

    FAILED means the doctor stopped before a verdict: ``stage``, ``failure`` (the cause named, from
    the rank that failed first, see :mod:`mmddp_hooks.doctor_failure`) and ``error``, one paragraph
    saying both and what to do; ``details`` has every rank's output and traceback. Where the cause
    was the requested ``size``, ``size_hint`` says so, with the smallest size that trains. HANGS:
    the ranks' watchdog found one stalled (``hang_timeout`` seconds without progress; default:
    derived from the step times, at least ``HANG_MIN_TIMEOUT_S``), ``hang_report`` says where. A rank
    that finished and wrote its findings, then died while exiting, does not change the verdict:
    ``teardown_fault`` carries its output.
    """
    from .ranks import run_on_ranks

    work_dir = tempfile.mkdtemp(prefix='ddp_doctor_')
    try:
        result = run_on_ranks(doctor_rank, nproc, timeout=timeout,
                              args=(config, cfg_options, iters, size, synthetic, work_dir,
                                    list(trusted), hang_timeout, pretrained, batch_size, subset))
        report = os.path.join(work_dir, 'hang_report.txt')
        hang_report = open(report).read() if os.path.exists(report) else None
        failure = None if result.work_done else _first_failure(result, work_dir, nproc, timeout)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    if hang_report is not None and not result.work_done:
        return dict(status=HANGS, hang_report=hang_report.strip(), error=result.describe())
    if failure is not None:
        hint = None
        if synthetic and size and failure['kind'] == 'error':
            hint = size_hint(config, cfg_options, size, pretrained)
        if hint:
            failure.update(kind='size', cause=hint['message'],
                           todo=f"Run with --size {hint['smallest'][0]} {hint['smallest'][1]}.")
        return dict(status=FAILED, stage=failure['stage'], failure=failure,
                    error=failure_paragraph(failure), details=result.describe(), size_hint=hint)
    findings = result.ranks[0].value
    findings['status'] = CRASHES if findings['crashes'] else OK
    findings['config_lines'] = config_lines(findings, is_lazy(config))
    findings['teardown_fault'] = result.describe() if result.teardown_fault else None
    report = findings.get('report', {})
    counts = (report.get('without_keepalive') or report).get('counts', {})
    if findings.get('batch_changed') and (counts.get('dynamic') or counts.get('never used')):
        findings['batch'] += ('. Usage rarely depends on the batch size, but a branch that runs '
                              'only for some samples, or only above some batch size, can: '
                              "--batch-size 0 checks at the config's own")
    return findings


def _first_failure(result, work_dir: str, nproc: int, timeout: float) -> Dict[str, Any]:
    """The cause of a run whose ranks did not all finish: the ranks' own Python errors (not a lost
    peer, which is what the others see of a rank that died; :func:`first_failure`), those the
    doctor classified and those raised before it ran (the rank's start: its process group), else
    a rank that died without one."""
    found = []
    for rank in range(nproc):
        path = os.path.join(work_dir, f'failure_rank{rank}.json')
        if os.path.exists(path):
            with open(path) as f:
                found.append(json.load(f))
    found += [_raised_outside(r, work_dir) for r in result.ranks
              if (r.error or '').startswith('Traceback') and r.rank not in
              {f['rank'] for f in found}]
    own = first_failure(found)
    if own:  # the ranks that died without an error were ended by the harness after it
        own['stopped'] = sorted(r.rank for r in result.ranks if r.exitcode not in (None, 0)
                                and not r.has_value and r.rank not in {f['rank'] for f in found})
        return own
    lost = sorted(f['rank'] for f in found)
    # no Python error of its own: killed (the OOM killer), or a crash in native code; of several,
    # the first to stop reporting its memory (the harness kills the others after it)
    dead = [r for r in result.ranks if r.exitcode not in (None, 0) and not r.has_value
            and r.rank not in lost]
    if dead and not result.timed_out:
        def stopped(r) -> float:
            path = os.path.join(work_dir, f'memory_rank{r.rank}')
            return os.path.getmtime(path) if os.path.exists(path) else 0.0
        first = min(dead, key=stopped)
        return dict(killed(first.rank, first.exitcode,
                           os.path.join(work_dir, f'memory_rank{first.rank}'), nproc),
                    consequences=lost)
    if found:
        return found[0]
    if result.timed_out:
        return dict(stage=RUNNING, rank=None, kind='timeout',
                    cause=f'the ranks did not finish within --timeout {timeout:g} s',
                    todo='Give them longer (--timeout), or fewer iterations (--iters).')
    return dict(stage=RUNNING, rank=None, kind='error', cause=cause_line(result.describe()),
                todo="--debug prints every rank's traceback.")


def _raised_outside(rank, work_dir: str) -> Dict[str, Any]:
    """A rank's Python error that the doctor's own code did not see (raised as the rank started,
    e.g. its process group's port taken), from its traceback."""
    memory = os.path.join(work_dir, f'memory_rank{rank.rank}')
    stage = open(memory).read().split(' ', 2)[2] if os.path.exists(memory) else STARTING
    cause = cause_line(rank.error)
    return dict(stage=stage, rank=rank.rank, cause=cause,
                kind=LOST_PEER if any(p in cause for p in PEER_LOST) else 'error',
                todo="--debug prints every rank's traceback.")


def preflight(config: str, cfg_options: Optional[dict], synthetic: bool = True,
              subset: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """What stops the doctor before any rank starts, checked once here: a config that does not
    load (its imports, lazy ones too, run now), data the dry run cannot make. None if none."""
    cfg = None
    try:
        cfg = load_config(config, cfg_options)
        _resolve(cfg)
    except BaseException as err:
        return classify(err, LOADING, config, cfg)
    if subset and synthetic:
        return dict(stage=LOADING, rank=None, kind='options', cause='--subset K takes the first K '
                    "samples of the config's own data", todo='Add --real-data.')
    if synthetic and not (cfg.get('ddp_doctor') or {}).get('synthetic_batch'):
        from .synthetic import SyntheticDataUnsupported, use_synthetic
        try:
            use_synthetic(cfg, max_iters=1)
        except SyntheticDataUnsupported as err:  # its message names the ways out, or: these
            named = 'synthetic_batch' in str(err)
            return dict(stage=DATA, rank=None, kind='synthetic data', cause=str(err).rstrip('.'),
                        todo='' if named else SYNTHETIC_WAYS_OUT)
        except Exception:  # the ranks say what went wrong, stage by stage
            return None
    return None


SYNTHETIC_WAYS_OUT = ("Two ways out: the config's own data, the first K samples "
                      '(--real-data --subset K), or your own batches: '
                      "ddp_doctor = dict(synthetic_batch='my_pkg.make_batch') in the config "
                      '(README: "Research code").')


def _resolve(node: Any) -> None:
    """Read every value of a config: a lazy (new-style) config imports its objects when read."""
    if isinstance(node, (dict, Config)):
        for key in list(node.keys()):
            _resolve(node[key])
    elif isinstance(node, (list, tuple)):
        for item in node:
            _resolve(item)
