"""The contract: with the hook, training equals plain DDP's ``find_unused_parameters=True``.

Each case trains a model with a real habit (tests/scenarios.py) through a Runner for 100 iterations,
with a val loop every 4 and SGD with momentum and weight decay (so a zero gradient where ``True``
leaves ``None`` shows), once with DDPAutoTuneHook and once as plain DDP, from the same seeds in the
same ranks. Where ``True`` cannot run (reentrant checkpointing), the reference is plain ``False``.
"""
import contextlib
from typing import Any, Dict, Iterator, List

import torch

import scenarios

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
