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
from typing import Any, Dict, Iterator, List, Set

import torch

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
