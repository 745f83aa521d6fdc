"""The contract: with the hook, training equals plain DDP's ``find_unused_parameters=True``.

Each case trains a model with a real habit (tests/scenarios.py) through a Runner for 100 iterations,
with a val loop every 4 and SGD with momentum and weight decay (so a zero gradient where ``True``
leaves ``None`` shows), once with DDPAutoTuneHook and once as plain DDP, from the same seeds in the
same ranks. Where ``True`` cannot run (reentrant checkpointing), the reference is plain ``False``.
"""
import contextlib
import inspect
import sys
import types
from typing import Any, Dict, Iterator, List, Optional, Set

import torch
import torch.distributed as dist

import scenarios
import trainable_cases

ITERS = 100
SGD = dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=1e-2)
LATE = 'ignored parameters woke up'
OFF = 'parameters got no gradient on any rank'

# model; optimizer-wrapper keys; the config's find_unused (tuned run) and the reference's
CASES: Dict[str, Dict[str, Any]] = {
    'called_but_unused': dict(model='CalledButUnused'),
    'predict_only_head': dict(model='PredictOnlyHead'),
    'rank_fixed': dict(model='RankOneBranch'),
    'late_module': dict(model='LateModule'),
    'late_param': dict(model='LateParam'),
    'switched_off': dict(model='SwitchedOff'),
    'reentrant_checkpoint': dict(model='ReentrantCheckpoint', config_find_unused=True,
                                 reference_find_unused=False),
    'amp_bf16': dict(model='LateModule', optim_wrapper=dict(type='AmpOptimWrapper',
                                                            dtype='bfloat16')),
    'grad_clip': dict(model='SwitchedOff', optim_wrapper=dict(clip_grad=dict(max_norm=0.05))),
    'two_param_groups': dict(model='LateModule', optim_wrapper=dict(paramwise_cfg=dict(
        custom_keys={'distill': dict(lr_mult=0.5, decay_mult=0.0)}))),
    'grad_accumulation': dict(model='LateModule', optim_wrapper=dict(accumulative_counts=2)),
}


@contextlib.contextmanager
def allow_amp_on_cpu() -> Iterator[None]:
    """MMEngine's AmpOptimWrapper asserts a GPU, though autocast runs bf16 on CPU and its
    GradScaler disables itself there: lift the assertion while the block runs (the same ranks run
    other cases afterwards)."""
    import mmengine.optim.optimizer.amp_optimizer_wrapper as amp

    original = amp.is_cuda_available
    if not torch.cuda.is_available():
        amp.is_cuda_available = lambda: True
    try:
        yield
    finally:
        amp.is_cuda_available = original


def run_contract(names: List[str], iters: int = ITERS) -> Dict[str, Dict[str, Any]]:
    """On every rank: each case with the hook, then as plain DDP; what the tests compare."""
    out = {}
    with allow_amp_on_cpu():
        for name in names:
            case = CASES[name]
            kw = dict(iters=iters, optimizer=SGD, optim_wrapper=case.get('optim_wrapper'),
                      val_interval=4, log_interval=50)
            tuned = scenarios.train(case['model'], hook=dict(probe_iters=4),
                                    find_unused=case.get('config_find_unused', False), **kw)
            reference = scenarios.train(case['model'],
                                        find_unused=case.get('reference_find_unused', True), **kw)
            out[name] = scenarios.compare_runs(tuned, reference)
    return out


# compile=True (MMEngine compiles the wrapper's train_step): SwitchedOn's branch wakes up at WOKEN,
# trunk.0 is frozen at 30 (under the plan's guard) and trunk.2 at 80 (under the find_unused=True plan
# the wake-up switched to). The backend: aot_eager traces exactly what inductor's would (the crash of
# #37 was dynamo's, while tracing) and compiles forward and backward graphs; inductor adds C++ codegen,
# 31 s of a 36 s run here against 7.5 s (tests/test_gpu.py runs compile=True itself).
COMPILE = dict(backend='aot_eager')
WOKEN = 60
COMPILED_FLIPS = [(30, 'freeze', ['trunk.0.*']), (80, 'freeze', ['trunk.2.*'])]
# the wrapper's frames that may be compiled: train_step, and what it calls on the way to the model
# (dynamo runs train_step itself eagerly: it cannot break the graph inside MMEngine's optim_context)
TRACED = {'ReconfigurableDDP.train_step', 'ReconfigurableDDP._run_forward', 'ReconfigurableDDP.forward'}


def run_compiled(compile: Any = COMPILE, iters: int = ITERS) -> Dict[str, Any]:
    """On every rank: SwitchedOn with the hook and ``compile``, then plain
    ``MMDistributedDataParallel(find_unused_parameters=True)`` with it; what the tests compare, and
    which of this package's functions were compiled. Each run starts from a fresh dynamo: compiled
    code is cached per function, and the second run would meet the first's recompile limit (the
    optimizer's step reaches it, and runs uncompiled from there)."""
    import torch._dynamo

    kw = dict(iters=iters, optimizer=SGD, val_interval=4, log_interval=50, compile=compile)
    torch._dynamo.reset()
    tuned = scenarios.train('SwitchedOn', hook=dict(probe_iters=4), extra_hooks=_flips(), **kw)
    ours = compiled_functions('mmddp_hooks')
    model = compiled_functions('scenarios', scenarios.SwitchedOn)
    torch._dynamo.reset()
    reference = scenarios.train('SwitchedOn', prewrap=True, find_unused=True, extra_hooks=_flips(),
                                **kw)
    return dict(scenarios.compare_runs(tuned, reference), ours=sorted(ours), model=sorted(model))


def _flips() -> List[Any]:
    return [scenarios.SwitchOn(WOKEN), trainable_cases.FlipRequiresGrad(COMPILED_FLIPS)]


def run_sync_bn(sync_bn: Optional[str] = 'torch', iters: int = ITERS) -> Dict[str, Any]:
    """On every rank: NormedLate (a BatchNorm in the trunk, a branch that wakes up after the probe)
    with the hook and the config's ``sync_bn``, then as plain
    ``MMDistributedDataParallel(find_unused_parameters=True)`` with it; what the tests compare, and
    the layers each trained. SyncBatchNorm runs on a GPU only: on CPU the wrapper reverts it to
    BatchNorm, and the plain reference keeps BatchNorm."""
    kw = dict(iters=iters, optimizer=SGD, val_interval=4, log_interval=50, sync_bn=sync_bn)
    tuned = scenarios.train('NormedLate', hook=dict(probe_iters=4), **kw)
    reference = scenarios.train('NormedLate', prewrap=True, find_unused=True, **kw)
    return dict(scenarios.compare_runs(tuned, reference), layers=tuned['layers'],
                reference_layers=reference['layers'])


# AmpOptimWrapper accumulating over ACCUMULATE iterations, driven through train_step by hand as
# MMEngine's own wrapper tests do; SwitchedOn's branch wakes up at AMP_WAKE, inside a window
ACCUMULATE, AMP_ITERS, AMP_WAKE = 3, 30, 22


def amp_accumulation(dtype: str = 'float16') -> Dict[str, Any]:
    """On every rank: ``ReconfigurableDDP.train_step`` with a ``find_unused_parameters=False`` plan
    that ignores the branch, its guard live (until the branch wakes up: it averages the branch in
    that step and switches), against plain ``MMDistributedDataParallel(find_unused_parameters=True)``
    with the same ``AmpOptimWrapper``; each run's losses, parameters, the iterations in which the
    guard was armed, the switches, and the loss scale at the end (1.0 where GradScaler is off:
    on CPU)."""
    from mmengine.model import MMDistributedDataParallel
    from mmengine.optim import AmpOptimWrapper

    from mmddp_hooks.plan import DDPPlan
    from mmddp_hooks.wrapper import ReconfigurableDDP

    cuda = torch.cuda.is_available()
    devices = dict(device_ids=[torch.cuda.current_device()]) if cuda else {}
    out = {}
    with allow_amp_on_cpu():
        for name in ('tuned', 'plain'):
            torch.manual_seed(0)
            model = scenarios.SwitchedOn().to('cuda' if cuda else 'cpu')
            if name == 'tuned':
                ddp = ReconfigurableDDP(model, **devices)
                ddp.apply_plan(DDPPlan(False, ignore=['distill.weight', 'distill.bias']))
            else:
                ddp = MMDistributedDataParallel(model, find_unused_parameters=True, **devices)
            optim = AmpOptimWrapper(optimizer=torch.optim.SGD(
                model.parameters(), lr=SGD['lr'], momentum=SGD['momentum'],
                weight_decay=SGD['weight_decay']), accumulative_counts=ACCUMULATE, dtype=dtype)
            optim.initialize_count_status(ddp, 0, AMP_ITERS)
            g = torch.Generator().manual_seed(dist.get_rank())
            losses, guarded = [], []
            for it in range(AMP_ITERS):
                model.distill_on = it >= AMP_WAKE
                data = dict(inputs=torch.randn(4, scenarios.DIM, generator=g),
                            target=torch.randn(4, 1, generator=g))
                losses.append(float(ddp.train_step(data, optim_wrapper=optim)['loss']))
                if getattr(ddp, 'guard', None) is not None:
                    guarded.append(it)
            out[name] = dict(losses=losses, guarded=guarded, scale=float(optim.loss_scaler.get_scale()),
                             switch_log=list(getattr(ddp, 'switch_log', [])),
                             params={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                             digest=scenarios.param_digest(model))
    tuned, plain = out['tuned'], out['plain']
    return dict(losses=tuned['losses'], plain_losses=plain['losses'], guarded=tuned['guarded'],
                switch_log=tuned['switch_log'], scale=tuned['scale'], plain_scale=plain['scale'],
                digest=tuned['digest'],
                bit_equal=all(torch.equal(tuned['params'][k], plain['params'][k]) for k in plain['params']),
                param_diff=max((tuned['params'][k] - plain['params'][k]).abs().max().item()
                               for k in plain['params']))


def compiled_functions(package: str, *only: type) -> Set[str]:
    """Qualified names of the functions of ``package``'s modules (or of the classes ``only``) that
    torch.compile holds compiled code for, nested functions included."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    owners: List[Any] = list(only) or [m for n, m in list(sys.modules.items())
                                       if n == package or n.startswith(f'{package}.')]
    codes = []
    for owner in owners:
        for value in list(vars(owner).values()):
            members = [value] + (list(vars(value).values()) if inspect.isclass(value)
                                 and value.__module__.split('.')[0] == package else [])
            for m in members:
                m = getattr(m, '__func__', getattr(m, 'fget', m))
                if inspect.isfunction(m) and m.__module__.split('.')[0] == package:
                    codes.append(inspect.unwrap(m).__code__)
    found = set()
    while codes:
        code = codes.pop()
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        if _debug_get_cache_entry_list(code):
            found.add(code.co_qualname)
    return found
