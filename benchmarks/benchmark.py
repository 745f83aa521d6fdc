"""Step-time benchmark of DDP settings against the auto plan, interleaved in the same processes.

Every setting gets its own replica of the scenario's model (same init) in the same N gloo ranks. Each
round runs one step of every setting, in a rotating order, each after a barrier; a step's time is the
slowest rank's. Ratios are taken per round against the best valid hand-picked setting and summarised
by their median, so machine noise that hits a whole round cancels out.

Validity is measured, not assumed, for ``auto`` as for every hand-picked setting: during warm-up, a
``find_unused_parameters=False`` setting whose reducer did not finalise (DDP's own check) is invalid
and its error text kept (the iteration is rescued by zero-filling so the peers do not hang); an
ignored parameter that received a gradient on some rank is invalid (replicas would diverge); and
after warm-up every setting's parameters must equal those of the ``find_unused_parameters=True``
replica (SGD with momentum and weight decay, so a zero gradient where ``True`` leaves ``None`` shows).
``static_graph=True`` is not run where the probe saw usage change between iterations: DDP raises
inside backward there, which would hang the peers. The guard stays live in the timed rounds, and
the times ``auto`` left its plan are reported.

Real models (:func:`real_scenarios`: torchvision ResNet-50 and ViT-B/16 with a head that never
reaches the loss, and an mmseg FCN) run on a GPU under NCCL with bf16 autocast, one rank per GPU,
against a fixed baseline: plain DDP with ``find_unused_parameters=False`` and the unused head
DDP-ignored, the best a user could pick by hand (``REAL_SETTINGS``).

:func:`rebuild_memory` measures something else: the peak memory of a rebuild against that of
ordinary steps.
"""
import contextlib
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mmddp_hooks import dist as ddist
from mmddp_hooks.autotune import AutoTuner, ProbeSettings
from mmddp_hooks.guard import reducer_finalized, zero_fill
from mmddp_hooks.plan import DDPPlan
from mmddp_hooks.reducer_params import ignore_keys_for
from mmddp_hooks.report import DYNAMIC, NEVER
from mmddp_hooks.wrapper import ReconfigurableDDP

PARAM_TOLERANCE = 1e-6
SETTINGS = ('find_unused=False', 'find_unused=True', 'find_unused=True+bucket_view',
            'static_graph', 'ignore_unused', 'freeze_unused', 'auto')
# the real models' settings: the baseline first, then plain True, the wrapper rebuilt as True, auto
REAL_SETTINGS = ('ignore_unused', 'find_unused=True', 'reconfigurable_true', 'auto')


class Blocks(nn.Module):
    """``depth`` residual blocks of ``width``; ``branch(step)`` decides whether the extra head runs;
    the first ``frozen`` blocks do not require grad (a frozen trunk that stays frozen)."""

    def __init__(self, depth: int, width: int, branch: Optional[Callable[[int], bool]] = None,
                 frozen: int = 0):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.extra = nn.Sequential(nn.Linear(width, width), nn.Linear(width, width))
        self.branch = branch
        self.blocks[:frozen].requires_grad_(False)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        if self.branch is not None and self.branch(step):
            x = x + self.extra(x)
        return x.square().mean()


def _never(step: int) -> bool:
    return False


def _rank1(step: int) -> bool:
    return dist.get_rank() == 1


def _alternating(step: int) -> bool:
    return (step + dist.get_rank()) % 2 == 0


def _always(step: int) -> bool:
    return True


def _late(step: int) -> bool:
    return step >= 5  # after the probe (4 steps), within the warm-up


SCENARIOS: Dict[str, Dict[str, Any]] = {
    'no_unused': dict(depth=8, width=64, branch=_always),
    'fixed_unused': dict(depth=8, width=64, branch=_never),
    'per_rank_unused': dict(depth=8, width=64, branch=_rank1),
    'dynamic': dict(depth=8, width=64, branch=_alternating),
    'large_fixed_unused': dict(depth=240, width=16, branch=_never),
    'wakes_up': dict(depth=8, width=64, branch=_late),
    'frozen_part': dict(depth=8, width=64, branch=_never, frozen=4),
}
QUICK = {'no_unused': dict(depth=3, width=8, branch=_always),
         'fixed_unused': dict(depth=3, width=8, branch=_never),
         'dynamic': dict(depth=3, width=8, branch=_alternating),
         'wakes_up': dict(depth=3, width=8, branch=_late)}


def _autocast(device: str) -> Any:
    """bf16 autocast on a GPU, as the real models train there; nothing on CPU."""
    return torch.autocast('cuda', dtype=torch.bfloat16) if device == 'cuda' else \
        contextlib.nullcontext()


class MMSegStep(nn.Module):
    """A real mmseg FCN ResNet-18 (``configs/mmseg/fcn_r18_stage4-unused.py``) on ``batch`` inputs
    of ``size`` x ``size``, on ``device``."""

    def __init__(self, config: str, size: int = 64, batch: int = 2, device: str = 'cpu') -> None:
        super().__init__()
        from mmengine.config import Config
        from mmengine.model import revert_sync_batchnorm

        from mmddp_hooks.model_from_config import build_model
        from mmddp_hooks.synthetic import use_synthetic

        cfg = Config.fromfile(config)
        use_synthetic(cfg, img_size=(size, size), max_iters=1)
        torch.manual_seed(0)
        self.model = revert_sync_batchnorm(build_model(cfg)).to(device)
        self.device = device
        from mmengine.registry import DATASETS
        from mmengine.runner import set_random_seed

        dataset = DATASETS.build(cfg.train_dataloader.dataset)
        # the pipeline's random crops and flips draw from numpy and random: every setting's
        # replica must see the same batch, or none of them trains like find_unused=True's
        set_random_seed(ddist.get_rank())
        samples = [dataset[i] for i in range(batch)]
        self.data = self.model.data_preprocessor(
            dict(inputs=[b['inputs'] for b in samples],
                 data_samples=[b['data_samples'] for b in samples]), training=True)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        with _autocast(self.device):
            losses = self.model(**self.data, mode='loss')
        return self.model.parse_losses(losses)[0]


class TorchvisionStep(nn.Module):
    """A torchvision classifier (``arch``: a builder or class of ``torchvision.models``, with
    ``kwargs``) and a second head, shaped like its last layer, that never reaches the loss: the
    unused head users report. One fixed batch of random images and labels on ``device``."""

    def __init__(self, arch: str, batch: int, image: int, device: str = 'cpu',
                 **kwargs: Any) -> None:
        super().__init__()
        import torchvision

        torch.manual_seed(0)
        self.net = getattr(torchvision.models, arch)(**kwargs)
        last = [m for m in self.net.modules() if isinstance(m, nn.Linear)][-1]
        self.unused_head = nn.Linear(last.in_features, last.out_features)
        self.to(device)
        self.device = device
        g = torch.Generator().manual_seed(ddist.get_rank())
        self.images = torch.randn(batch, 3, image, image, generator=g).to(device)
        self.labels = torch.randint(last.out_features, (batch,), generator=g).to(device)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        with _autocast(self.device):
            logits = self.net(self.images)
        return F.cross_entropy(logits.float(), self.labels)


def real_scenarios(device: str = 'cuda', quick: bool = False,
                   mmseg_config: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """ResNet-50 and ViT-B/16 at batch 16 and 64 (224 x 224), and the mmseg FCN (8 x 512 x 512)
    where ``mmseg_config`` is given, timed in ``REAL_SETTINGS`` against plain DDP with the unused
    head ignored. ``quick``: a ResNet-18 and a one-block ViT on 32 x 32 images, batch 2, for a
    check on CPU."""
    common = dict(device=device, settings=REAL_SETTINGS, baseline='ignore_unused')
    if quick:
        tiny_vit = dict(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32,
                        mlp_dim=64, num_classes=10)
        return {'resnet18_b2': dict(arch='resnet18', batch=2, image=32, **common),
                'tiny_vit_b2': dict(arch='VisionTransformer', batch=2, image=32,
                                    kwargs=tiny_vit, **common)}
    out = {f'{arch}_b{batch}': dict(arch=arch, batch=batch, image=224, **common)
           for arch in ('resnet50', 'vit_b_16') for batch in (16, 64)}
    if mmseg_config:
        out['mmseg_fcn_r18_b8'] = dict(config=mmseg_config, size=512, batch=8, **common)
    return out


def _make(scenario: Dict[str, Any]) -> nn.Module:
    device = scenario.get('device', 'cpu')
    if 'config' in scenario:
        return MMSegStep(scenario['config'], scenario.get('size', 64), scenario.get('batch', 2),
                         device)
    if 'arch' in scenario:
        return TorchvisionStep(scenario['arch'], scenario['batch'], scenario['image'], device,
                               **scenario.get('kwargs', {}))
    return Blocks(scenario['depth'], scenario['width'], scenario['branch'],
                  scenario.get('frozen', 0))


def _wrapped_step(wrapper: ReconfigurableDDP, x: torch.Tensor, step: int,
                  opt: Optional[torch.optim.Optimizer] = None) -> None:
    """One training step through the wrapper's probe/guard, as its ``train_step`` does it."""
    loss = wrapper(x, step)
    wrapper.before_backward(loss)
    loss.backward()
    change = wrapper.after_backward()
    if opt is not None:
        opt.step()
    wrapper.module.zero_grad()
    wrapper.after_step(change)


def _probe_usage(scenario: Dict[str, Any], steps: int, x: torch.Tensor):
    """The product's probe on a scratch replica: which parameters are unused, and how."""
    tuner = AutoTuner(ReconfigurableDDP(_make(scenario)), ProbeSettings(iters=steps))
    tuner.start()
    for step in range(steps):
        _wrapped_step(tuner.model, x, step)
        done = tuner.after_iter(None)
    return done[0]


class _Runner:
    """One setting's replica, optimizer and per-step validity checks on this rank."""

    def __init__(self, name: str, scenario: Dict[str, Any], report, probe_iters: int = 4) -> None:
        self.name, self.error = name, None
        module = _make(scenario)
        never = report.names_of(NEVER)
        self.watched: List[torch.Tensor] = []
        named = dict(module.named_parameters())
        if name == 'freeze_unused':
            for n in never:
                named[n].requires_grad_(False)
            self.watched = [named[n] for n in never]
        if name == 'ignore_unused':
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                module, ignore_keys_for(module, never))
            self.watched = [named[n] for n in never]
        if name == 'auto':
            self.ddp: nn.Module = ReconfigurableDDP(module)
            self.tuner = AutoTuner(self.ddp, ProbeSettings(iters=probe_iters))
            self.tuner.start()
        elif name == 'reconfigurable_true':  # what auto costs where its plan is True
            self.ddp = ReconfigurableDDP(module)
            self.ddp.apply_plan(DDPPlan(True))
        else:
            self.ddp = DistributedDataParallel(
                module, find_unused_parameters=name.startswith('find_unused=True'),
                gradient_as_bucket_view=name.endswith('bucket_view'),
                static_graph=name == 'static_graph')
        self.module = module
        self.opt = torch.optim.SGD(module.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-2)

    def step(self, x: torch.Tensor, step: int, check: bool) -> None:
        # the same dropout masks in every setting's replica, so their parameters can be compared
        torch.manual_seed(1000 * step + ddist.get_rank())
        if isinstance(self.ddp, ReconfigurableDDP):
            _wrapped_step(self.ddp, x, step, self.opt)
            return
        if self.name == 'static_graph':  # raises inside backward, on every rank, if usage changes
            if self.error:  # it did: its reducer is broken, leave it
                return
            try:
                self.ddp(x, step).backward()
            except RuntimeError as e:
                self.error = self.error or 'DDP: ' + str(e).split('. ')[0]
                return
        else:
            self.ddp(x, step).backward()
        if check:
            self._check()
        self.opt.step()
        self.opt.zero_grad()

    def flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()])

    def _check(self) -> None:
        reducer = self.ddp.reducer
        if not self.name.startswith('find_unused=True') and not reducer_finalized(reducer):
            try:
                reducer._check_reducer_finalized()
            except RuntimeError as e:
                self.error = self.error or 'DDP: ' + str(e).split('. ')[0]
            zero_fill([p for p in self.module.parameters() if p.requires_grad and p.grad is None])
        if any(p.grad is not None for p in self.watched):
            self.error = self.error or ('a parameter outside DDP received a gradient: replicas '
                                        'would diverge silently')


def run_scenario(scenario: Dict[str, Any], rounds: int, warmup: int, probe_iters: int = 4,
                 watchdog: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """On every rank: warm up and validate each setting, then time the valid ones round-robin;
    then, with ``watchdog`` (``pairs``, ``block_s``, ``interval``), what HangWatchdogHook adds to
    auto's step."""
    torch.set_num_threads(1)
    # a GPU step is timed to its end: every setting's kernels, not only their launch
    sync = torch.cuda.synchronize if scenario.get('device') == 'cuda' else _no_sync
    x = torch.randn(4, scenario.get('width', 1))
    report = _probe_usage(scenario, probe_iters, x)
    dynamic = bool(report.names_of(DYNAMIC))
    settings = scenario.get('settings', SETTINGS)
    runners = {name: _Runner(name, scenario, report, probe_iters) for name in settings
               if not (name == 'static_graph' and dynamic)}
    invalid = {'static_graph': 'usage changes between iterations (measured): static_graph=True '
                               'raises inside backward'} if dynamic else {}
    step = 0
    auto = runners['auto']
    probe_time = []
    for _ in range(max(warmup, probe_iters + 2)):
        for name, r in runners.items():
            sync()
            t0 = time.perf_counter()
            r.step(x, step, check=True)
            if name == 'auto' and auto.ddp.probe is not None:
                sync()
                probe_time.append(time.perf_counter() - t0)
        if auto.ddp.probe is not None:
            t0 = time.perf_counter()
            done = auto.tuner.after_iter(None)
            if done is not None:
                auto.tuner.apply(*done)
                rebuild_time = time.perf_counter() - t0
        step += 1
    reference = runners['find_unused=True'].flat_params()
    for r in runners.values():
        diff = (r.flat_params() - reference).abs().max().item()
        if diff > PARAM_TOLERANCE and r.error is None:
            r.error = (f'trains differently from find_unused=True: max parameter difference '
                       f'{diff:.2e} after {step} steps')
    flags = torch.tensor([float(r.error is not None) for r in runners.values()])
    ddist.all_reduce_flags(flags, op=dist.ReduceOp.MAX)
    for (name, r), bad in zip(runners.items(), flags.tolist()):
        if bad:
            invalid[name] = r.error or 'invalid on another rank'
    timed = [n for n in runners if n not in invalid]
    times: Dict[str, List[float]] = {n: [] for n in timed}
    for rnd in range(rounds):
        order = timed[rnd % len(timed):] + timed[:rnd % len(timed)]
        for name in order:
            ddist.barrier()
            sync()
            t0 = time.perf_counter()
            runners[name].step(x, step, check=False)
            sync()
            times[name].append(time.perf_counter() - t0)
        step += 1
    gathered = ddist.all_gather_object(times)
    slowest = {n: [max(g[n][i] for g in gathered) for i in range(rounds)] for n in timed}
    cost = None
    if watchdog and 'auto' in slowest:
        per_block = max(10, int(watchdog['block_s'] / statistics.median(slowest['auto'])))
        cost = _watchdog_cost(auto, x, step + 1, int(watchdog['pairs']), per_block,
                              watchdog['interval'])
    return dict(slowest=slowest, invalid=invalid, plan=auto.ddp.plan.summary(),
                settings=list(settings), baseline=scenario.get('baseline'),
                switches=list(auto.ddp.switch_log),
                probe_iters=probe_iters, probe_step_s=statistics.median(probe_time),
                rebuild_s=rebuild_time, tracking=_tracking_cost(auto.ddp, rounds), watchdog=cost)


def _no_sync() -> None:
    """A CPU step has ended when it returns."""


def _watchdog_cost(auto: '_Runner', x: torch.Tensor, step: int, pairs: int, per_block: int,
                   interval: float) -> Dict[str, Any]:
    """Auto's step with HangWatchdogHook against without, in alternating blocks of ``per_block``
    steps (on-off, then off-on): its heartbeat thread runs through a whole block, so blocks, not
    single steps, are what can be compared. The hook's per-iteration calls are made as the Runner
    makes them. Per pair: the ratio of the blocks' median step (slowest rank)."""
    import tempfile
    from types import SimpleNamespace

    from mmddp_hooks.hooks.hang_watchdog_hook import HangWatchdogHook

    hook = HangWatchdogHook(interval=interval)
    work_dir = tempfile.mkdtemp(prefix='mmddp_bench_watchdog_')
    blocks: List[List[float]] = []
    for pair in range(pairs):
        for on in ((True, False) if pair % 2 == 0 else (False, True)):
            ddist.barrier()
            if on:
                hook.start(work_dir)
            times = []
            for _ in range(per_block):
                ddist.barrier()
                t0 = time.perf_counter()
                if on:
                    hook.before_train_iter(SimpleNamespace(iter=step), step)
                auto.step(x, step, check=False)
                if on:
                    hook.after_train_iter(SimpleNamespace(iter=step), step)
                times.append(time.perf_counter() - t0)
                step += 1
            hook.stop()
            blocks.append(times)
    gathered = ddist.all_gather_object(blocks)
    medians = [statistics.median(max(g[b][i] for g in gathered) for i in range(per_block))
               for b in range(2 * pairs)]
    ratios = []
    for pair in range(pairs):
        first, second = medians[2 * pair], medians[2 * pair + 1]
        ratios.append(first / second if pair % 2 == 0 else second / first)
    return dict(ratios=ratios, per_block=per_block, interval=interval, beats=hook.beats,
                reports=len(hook.reports), on_ms=1e3 * statistics.median(
                    medians[2 * p + p % 2] for p in range(pairs)))


def _tracking_cost(wrapper: ReconfigurableDDP, rounds: int) -> Dict[str, float]:
    """What following the trainable set adds to a step in which nothing changes, timed apart (it
    is too small to show in a step's time): reading every parameter's ``requires_grad`` against the
    build, an upper bound of both paths (the guard reads the parameters it watches before
    backward; a moved flag sends that step through its per-parameter sums). Slowest rank,
    median."""
    reads = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        wrapper.trainable.change()
        reads.append(time.perf_counter() - t0)
    gathered = ddist.all_gather_object(reads)
    return dict(reads_s=statistics.median(max(g[i] for g in gathered) for i in range(rounds)),
                guarded=wrapper.guard is not None)


def summarise(name: str, raw: Dict[str, Any]) -> Dict[str, Any]:
    """Medians, per-round ratios against the best valid hand-picked setting (or the scenario's
    baseline, where it is valid), spreads."""
    slowest = raw['slowest']
    medians = {n: statistics.median(v) for n, v in slowest.items()}
    hand = [n for n in medians if n != 'auto']
    best = raw.get('baseline') if raw.get('baseline') in medians else min(hand, key=medians.get)
    rows = []
    for n in raw.get('settings', SETTINGS):
        if n in raw['invalid']:
            rows.append(dict(setting=n, valid=False, error=raw['invalid'][n]))
            continue
        if n not in slowest:
            continue
        ratios = [a / b for a, b in zip(slowest[n], slowest[best])]
        rows.append(dict(setting=n, valid=True, median_ms=1e3 * medians[n],
                         ratio=statistics.median(ratios), ratio_min=min(ratios),
                         ratio_max=max(ratios)))
    amortised = None
    if 'auto' in medians:  # an invalid auto is reported as such, not timed
        auto_ms = medians['auto']
        overhead = raw['probe_iters'] * (raw['probe_step_s'] - auto_ms) + raw['rebuild_s']
        amortised = max(overhead, 0.0) / (1000 * auto_ms)
    return dict(scenario=name, best=best, baseline=raw.get('baseline'), plan=raw['plan'],
                switches=raw['switches'], rows=rows,
                probe_amortised_1000=amortised, tracking=raw.get('tracking'),
                watchdog=raw.get('watchdog'),
                auto_ms=1e3 * medians['auto'] if 'auto' in medians else None)


def format_table(results: List[Dict[str, Any]]) -> str:
    lines = ['| scenario | setting | median step (slowest rank) | ratio vs best valid '
             '(median, min-max) |', '| --- | --- | --- | --- |']
    for res in results:
        for row in res['rows']:
            if not row['valid']:
                lines.append(f"| {res['scenario']} | {row['setting']} | error | "
                             f"{row['error']} |")
                continue
            mark = '' if row['setting'] != res['best'] else \
                ' (baseline)' if res.get('baseline') == res['best'] else ' (best)'
            lines.append(f"| {res['scenario']} | {row['setting']}{mark} | "
                         f"{row['median_ms']:.2f} ms | {row['ratio']:.3f} "
                         f"({row['ratio_min']:.2f}-{row['ratio_max']:.2f}) |")
        probe = ('n/a' if res['probe_amortised_1000'] is None
                 else f"{100 * res['probe_amortised_1000']:.2f}%")
        lines.append(f"| {res['scenario']} | auto plan chose | {res['plan']} | probe cost over "
                     f"1000 iterations: {probe}; plan left {len(res['switches'])} times |")
        t = res.get('tracking')
        if t and res['auto_ms']:
            cost = 1e6 * t['reads_s']
            how = ("a moved flag rides the guard's per-step int" if t['guarded'] else
                   'no exchange while nothing changes (find_unused_parameters=True)')
            lines.append(f"| {res['scenario']} | auto: trainable-set tracking | {cost:.0f} us per "
                         f"step ({100 * cost / (1e3 * res['auto_ms']):.2f}% of auto's step) | "
                         f'requires_grad reads; {how} |')
        w = res.get('watchdog')
        if w:
            r = w['ratios']
            lines.append(f"| {res['scenario']} | auto + HangWatchdogHook (heartbeat every "
                         f"{w['interval']:g} s) | {w['on_ms']:.2f} ms | {statistics.median(r):.3f} "
                         f"({min(r):.2f}-{max(r):.2f}) vs auto without it, {len(r)} pairs of "
                         f"{w['per_block']}-step blocks; {w['reports']} hang reports |")
    return '\n'.join(lines)


def plot(results: List[Dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4 + 0.2 * len(results)))
    labels, values, colors = [], [], []
    for res in results:
        for row in res['rows']:
            if row['valid']:
                labels.append(f"{res['scenario']}: {row['setting']}")
                values.append(row['ratio'])
                colors.append('tab:green' if row['setting'] == 'auto' else 'tab:blue')
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.axvline(1.0, color='k', lw=0.8)
    ax.set_xlabel('step time / best valid hand-picked setting (median of per-round ratios)')
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- memory across a rebuild
def rebuild_memory(depth: int = 24, width: int = 2048, rounds: int = 4, bucket_view: bool = False,
                   batch: int = 8) -> Dict[str, Any]:
    """Peak memory (MB) of two ordinary steps, and of a rebuild (the plan switched between
    ``find_unused_parameters=True`` and ``False`` with the unused head ignored, both ways) followed
    by two steps, interleaved ``rounds`` times; SGD with momentum, on this rank's device.

    The default model has 109 M parameters (``depth`` blocks of ``width``, and an unused head of
    two). World size 1 is enough: a rebuild allocates the same on every rank. On a GPU the peak is
    ``torch.cuda.max_memory_allocated``; on CPU it is the process's peak RSS (``VmHWM``, reset by
    ``/proc/self/clear_refs``), which counts live tensors only where freed ones go back to the
    system: run it with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc otherwise keeps freed memory, and
    RSS shows what it held before)."""
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    module = Blocks(depth, width, _never)
    ddp = ReconfigurableDDP(module.cuda() if cuda else module, gradient_as_bucket_view=bucket_view,
                            **(dict(device_ids=[torch.cuda.current_device()]) if cuda else {}))
    unused = [n for n, _ in module.named_parameters() if n.startswith('extra.')]
    plans = [DDPPlan(False, ignore=unused), DDPPlan(True)]
    ddp.apply_plan(plans[0])
    opt = torch.optim.SGD(module.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-2)
    x = torch.randn(batch, width, device='cuda' if cuda else 'cpu')

    def steps() -> None:
        for step in range(2):
            _wrapped_step(ddp, x, step, opt)

    steps()
    rows = []
    for r in range(rounds):
        _reset_peak(cuda)
        steps()
        steady = _peak_mb(cuda)
        _reset_peak(cuda)
        ddp.apply_plan(plans[(r + 1) % 2])
        rebuild = _peak_mb(cuda)
        steps()
        rows.append(dict(steady_mb=steady, rebuild_mb=rebuild, rebuild_and_steps_mb=_peak_mb(cuda),
                         plan=plans[(r + 1) % 2].summary()))
    ddp.close_guard()
    return dict(params_m=sum(p.numel() for p in module.parameters()) / 1e6, bucket_view=bucket_view,
                peak='torch.cuda.max_memory_allocated' if cuda else 'VmHWM (peak RSS)', rounds=rows,
                ratio=max(r['rebuild_and_steps_mb'] for r in rows) / max(r['steady_mb'] for r in rows))


def _reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')


def _peak_mb(cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith('VmHWM:'))


# ----------------------------------------------------------------------- zero-weighted keep-alive
class TwoKinds(nn.Module):
    """A trunk, a head per batch kind and an adapter nothing calls; each rank alternates kinds,
    the ranks out of step. ``keep_alive`` adds ``0.0 *`` every idle parameter to the loss, as
    research code does so that ``find_unused_parameters=False`` does not crash."""

    def __init__(self, depth: int, width: int, keep_alive: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.heads = nn.ModuleList(nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))
                                   for _ in range(2))
        self.adapter = nn.Linear(width, width)
        self.keep_alive = keep_alive

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        kind = (step + ddist.get_rank()) % 2
        for block in self.trunk:
            x = x + torch.tanh(block(x))
        loss = self.heads[kind](x).square().mean()
        if self.keep_alive:
            idle = list(self.heads[1 - kind].parameters()) + list(self.adapter.parameters())
            loss = loss + 0.0 * sum(p.sum() for p in idle)
        return loss


def _count_bytes(counter: Dict[str, int], group: Any) -> Callable:
    """A DDP comm hook that all-reduces as DDP does and counts each bucket's bytes."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        counter['bytes'] += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(group, bucket)
    return hook


def run_keepalive(rounds: int, warmup: int, depth: int = 8, width: int = 64,
                  probe_iters: int = 4) -> Dict[str, Any]:
    """On every rank: the model with its keep-alive terms under ``find_unused_parameters=False``
    (what such repositories ship) against the model without them under DDPAutoTuneHook's plan,
    step by step in alternating order after a barrier, SGD with momentum and weight decay both.
    Per round each one's step time (slowest rank), bytes its buckets all-reduced per step, and
    how far apart their parameters end (the terms change training)."""
    torch.set_num_threads(1)
    x = torch.randn(4, width)
    group = dist.group.WORLD
    runs: Dict[str, Any] = {}
    for name, keep in (('keep-alive terms', True), ('plan without them', False)):
        module = TwoKinds(depth, width, keep)
        wrapper: nn.Module = DistributedDataParallel(module) if keep else ReconfigurableDDP(module)
        counter = {'bytes': 0}
        wrapper.register_comm_hook(None, _count_bytes(counter, group))
        if not keep:
            AutoTuner(wrapper, ProbeSettings(iters=probe_iters)).start()
        opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-2)
        runs[name] = dict(module=module, ddp=wrapper, opt=opt, counter=counter, times=[])

    def step(run: Dict[str, Any], i: int) -> None:
        if isinstance(run['ddp'], ReconfigurableDDP):
            _wrapped_step(run['ddp'], x, i, run['opt'])
            done = run['ddp'].tuner.after_iter(None)
            if done is not None:
                run['ddp'].tuner.apply(*done)
            return
        run['ddp'](x, i).backward()
        run['opt'].step()
        run['opt'].zero_grad()

    for i in range(max(warmup, probe_iters + 2)):
        for run in runs.values():
            step(run, i)
    names = list(runs)
    for run in runs.values():
        run['counter']['bytes'] = 0
    for r in range(rounds):
        i = warmup + r
        for name in (names if r % 2 == 0 else names[::-1]):
            ddist.barrier()
            t0 = time.perf_counter()
            step(runs[name], i)
            runs[name]['times'].append(time.perf_counter() - t0)
    gathered = ddist.all_gather_object({n: run['times'] for n, run in runs.items()})
    flat = {n: torch.cat([p.detach().reshape(-1) for p in run['module'].parameters()])
            for n, run in runs.items()}
    return dict(slowest={n: [max(g[n][k] for g in gathered) for k in range(rounds)] for n in names},
                bytes_per_step={n: run['counter']['bytes'] / rounds for n, run in runs.items()},
                plan=runs['plan without them']['ddp'].plan.summary(),
                params=sum(p.numel() for p in runs[names[0]]['module'].parameters()),
                n_params=len(list(runs[names[0]]['module'].parameters())),
                max_param_diff=(flat[names[0]] - flat[names[1]]).abs().max().item())


def summarise_keepalive(raw: Dict[str, Any]) -> Dict[str, Any]:
    """Per-round ratios of the keep-alive step to the plan's, their median and spread; bytes."""
    hack, plan = (raw['slowest'][n] for n in ('keep-alive terms', 'plan without them'))
    ratios = [a / b for a, b in zip(hack, plan)]
    bytes_hack, bytes_plan = (raw['bytes_per_step'][n] for n in ('keep-alive terms',
                                                                 'plan without them'))
    return dict(step_ratio=statistics.median(ratios), step_ratio_min=min(ratios),
                step_ratio_max=max(ratios), rounds=len(ratios), plan=raw['plan'],
                bucket_bytes_ratio=bytes_hack / bytes_plan if bytes_plan else None,
                # find_unused_parameters=True also all-reduces its used-parameter map: one int32
                # per parameter, outside the buckets (comm hooks do not see it)
                used_map_bytes=4 * raw['n_params'] if 'True' in raw['plan'] else 0,
                bytes_per_step=raw['bytes_per_step'], max_param_diff=raw['max_param_diff'])


def format_keepalive(res: Dict[str, Any]) -> str:
    b = res['bytes_per_step']
    return '\n'.join([
        '| keep-alive terms + find_unused_parameters=False vs the plan without them | ratio |',
        '| --- | --- |',
        f"| step time (median of {res['rounds']} interleaved rounds, min-max) | "
        f"{res['step_ratio']:.3f} ({res['step_ratio_min']:.2f}-{res['step_ratio_max']:.2f}) |",
        f"| bytes all-reduced in buckets per step | {res['bucket_bytes_ratio']:.3f} "
        f"({b['keep-alive terms']:.0f} vs {b['plan without them']:.0f}; the plan adds "
        f"{res['used_map_bytes']} bytes of used-parameter map) |",
        f"| plan without the terms | {res['plan']} |",
        f"| largest parameter difference after the run (SGD, momentum 0.9, weight decay 0.01) | "
        f"{res['max_param_diff']:.2e} |"])
