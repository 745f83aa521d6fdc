"""Trainable-set changes mid-run (freeze/unfreeze), against their reference.

The reference is plain ``MMDistributedDataParallel(find_unused_parameters=True)`` (``False`` where
``True`` cannot run) with every parameter trainable, whose optimizer step drops, as ``None``, the
gradients of the parameters frozen at that step: for a freeze this is real freezing under plain
``True`` bit for bit, and for an unfreeze it is what DDP built with the parameter would have done.
The tuned run freezes with ``requires_grad`` as users do: by hand in a hook (``FlipRequiresGrad``)
or with ``TrainableScheduleHook``.
"""
import fnmatch
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from mmddp_hooks.compat import resume_restores_data_position

import contract_cases
import scenarios

ITERS = 100
SGD = dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=1e-2)
Flip = Tuple[int, str, Sequence[str]]  # (iteration, 'freeze' | 'unfreeze', globs)

# model; frozen when wrapped; flips; optimizer-wrapper keys; the config's find_unused (tuned run)
# and the reference's; what the tuned run's plan must be in the end
CASES: Dict[str, Dict[str, Any]] = {
    'unfreeze': dict(model='AllUsed', frozen=['trunk.0.*'], flips=[(30, 'unfreeze', ['trunk.0.*'])]),
    # during the probe (4 iterations): it starts again on the new set
    'during_probe': dict(model='CalledButUnused', frozen=['trunk.0.*'],
                         flips=[(2, 'unfreeze', ['trunk.0.*'])]),
    'freeze': dict(model='AllUsed', flips=[(30, 'freeze', ['trunk.0.*'])]),
    'both': dict(model='AllUsed', frozen=['trunk.0.*'],
                 flips=[(30, 'unfreeze', ['trunk.0.*']), (60, 'freeze', ['trunk.2.*'])]),
    'ignore_plan': dict(model='CalledButUnused', frozen=['trunk.0.*'],
                        flips=[(30, 'unfreeze', ['trunk.0.*']), (70, 'freeze', ['head.*'])]),
    'zero_fill_plan': dict(model='RankOneBranch', flips=[(30, 'freeze', ['rank1_adapter.*']),
                                                         (60, 'unfreeze', ['rank1_adapter.*'])]),
    'find_unused_plan': dict(model='ModalityDropout', frozen=['trunk.0.*'],
                             flips=[(30, 'unfreeze', ['trunk.0.*']), (60, 'freeze', ['head.*'])]),
    'reentrant': dict(model='ReentrantCheckpoint', frozen=['block.0.*'], config_find_unused=True,
                      reference_find_unused=False,
                      flips=[(30, 'unfreeze', ['block.0.*']), (60, 'freeze', ['trunk.0.*'])]),
    'amp_bf16': dict(model='AllUsed', frozen=['trunk.0.*'],
                     optim_wrapper=dict(type='AmpOptimWrapper', dtype='bfloat16'),
                     flips=[(30, 'unfreeze', ['trunk.0.*']), (60, 'freeze', ['trunk.2.*'])]),
    # accumulation windows are iterations (2k, 2k+1): 31 and 61 fall inside one
    'accumulation': dict(model='AllUsed', frozen=['trunk.0.*'],
                         optim_wrapper=dict(accumulative_counts=2),
                         flips=[(31, 'unfreeze', ['trunk.0.*']), (61, 'freeze', ['trunk.2.*'])]),
    # ReconfigurableDDP without DDPAutoTuneHook, as the config asked
    'wrapper_only': dict(model='AllUsed', frozen=['trunk.0.*'], hook=False,
                         flips=[(30, 'unfreeze', ['trunk.0.*']), (60, 'freeze', ['head.*'])]),
    'wrapper_only_find_unused': dict(model='AllUsed', frozen=['trunk.0.*'], hook=False,
                                     config_find_unused=True,
                                     flips=[(30, 'unfreeze', ['trunk.0.*']),
                                            (60, 'freeze', ['head.*'])]),
    'accumulation_find_unused': dict(model='LateModule', frozen=['trunk.0.*'],
                                     optim_wrapper=dict(accumulative_counts=2),
                                     flips=[(31, 'unfreeze', ['trunk.0.*']),
                                            (61, 'freeze', ['trunk.2.*'])]),
}


class FlipRequiresGrad(Hook):
    """What users write by hand: flip ``requires_grad`` at an iteration (on one rank: a bug)."""

    def __init__(self, flips: Sequence[Flip], rank: Optional[int] = None) -> None:
        self.flips, self.rank = list(flips), rank

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if self.rank is not None and dist.get_rank() != self.rank:
            return
        for it, what, globs in self.flips:
            if runner.iter == it:
                for name, p in _module(runner).named_parameters():
                    if any(fnmatch.fnmatchcase(name, g) for g in globs):
                        p.requires_grad_(what == 'unfreeze')


def frozen_at(it: int, frozen: Sequence[str], flips: Sequence[Flip], names: List[str]) -> List[str]:
    """The parameters frozen at iteration ``it`` (flips apply before their iteration)."""
    state = {n: any(fnmatch.fnmatchcase(n, g) for g in frozen) for n in names}
    for at, what, globs in sorted(flips, key=lambda f: f[0]):
        if at <= it:
            for n in names:
                if any(fnmatch.fnmatchcase(n, g) for g in globs):
                    state[n] = what == 'freeze'
    return [n for n, f in state.items() if f]


class DropFrozenGrads(Hook):
    """The reference's side: every parameter trainable; the optimizer step drops, as None, the
    gradients of the parameters frozen at that step's iteration, and a backward leaves the
    gradients of the parameters frozen at its iteration as they were (inside an accumulation
    window, a parameter accumulates only the backwards in which it is trainable)."""

    def __init__(self, frozen: Sequence[str], flips: Sequence[Flip]) -> None:
        self.frozen, self.flips = frozen, flips
        self.drop: List[torch.Tensor] = []

    def before_train(self, runner) -> None:
        wrapper = runner.optim_wrapper
        step = wrapper.step

        backward = wrapper.backward

        def dropping_step(**kw):
            for p in self.drop:
                p.grad = None
            return step(**kw)

        def keeping_backward(loss, **kw):
            kept = [(p, p.grad.clone() if p.grad is not None else None) for p in self.drop]
            backward(loss, **kw)
            for p, g in kept:
                p.grad = g
        wrapper.step, wrapper.backward = dropping_step, keeping_backward

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        named = dict(_module(runner).named_parameters())
        self.drop = [named[n] for n in frozen_at(runner.iter, self.frozen, self.flips, list(named))]


def _module(runner):
    return runner.model.module if is_model_wrapper(runner.model) else runner.model


def reference(case: Dict[str, Any], **kw: Any) -> Dict[str, Any]:
    """Plain MMDistributedDataParallel, every parameter trainable, frozen gradients dropped."""
    return scenarios.train(case['model'], prewrap=True,
                           find_unused=case.get('reference_find_unused', True),
                           extra_hooks=[DropFrozenGrads(case.get('frozen', ()), case['flips'])],
                           **kw)


def run_cases(names: List[str], iters: int = ITERS) -> Dict[str, Dict[str, Any]]:
    """On every rank: each case with DDPAutoTuneHook and a hand-written flip hook, then its
    reference; what the tests compare."""
    out = {}
    with contract_cases.allow_amp_on_cpu():
        for name in names:
            case = CASES[name]
            kw = dict(iters=iters, optimizer=SGD, optim_wrapper=case.get('optim_wrapper'),
                      val_interval=4, log_interval=50)
            tuned = scenarios.train(case['model'],
                                    hook=dict(probe_iters=4) if case.get('hook', True) else None,
                                    find_unused=case.get('config_find_unused', False),
                                    frozen=case.get('frozen', ()),
                                    extra_hooks=[FlipRequiresGrad(case['flips'])], **kw)
            out[name] = scenarios.compare_runs(tuned, reference(case, **kw))
    return out


def plain_ddp_unfreeze(iters: int = 40) -> Dict[str, Any]:
    """The negative: plain DDP (no hook, no ReconfigurableDDP) never averages what it unfreezes."""
    case = CASES['unfreeze']
    out = scenarios.train_plain(case['model'], prewrap=True, find_unused=True, iters=iters,
                                optimizer=SGD, frozen=case['frozen'],
                                extra_hooks=[FlipRequiresGrad(case['flips'])])
    return dict(digest=out['digest'])


def rank_dependent(model: str, find_unused: bool, hook: bool, what: str = 'freeze',
                   module: str = 'trunk.0', rank: int = 1, iters: int = 12) -> Dict[str, Any]:
    """Rank ``rank`` alone freezes (or unfreezes) ``module`` at iteration 8: the run must stop
    there."""
    return scenarios.train_plain(model, hook=dict(probe_iters=2) if hook else None,
                                 find_unused=find_unused, iters=iters,
                                 frozen=[f'{module}.*'] if what == 'unfreeze' else (),
                                 wrapper=dict(trainable_change_timeout=2),
                                 extra_hooks=[FlipRequiresGrad([(8, what, [f'{module}.*'])],
                                                               rank=rank)])


# The config-driven schedule: what the optimizer holds (paramwise_cfg), and resume across a change.
PARAMWISE = dict(paramwise_cfg=dict(custom_keys={'trunk': dict(lr_mult=0.5, decay_mult=0.0)}))
SCHEDULE = [dict(at=30, unfreeze=['trunk.0.*']), dict(at=50, freeze=['head.*'])]
SCHEDULE_FLIPS = [(30, 'unfreeze', ['trunk.0.*']), (50, 'freeze', ['head.*'])]


def schedule_with_paramwise(iters: int = ITERS) -> Dict[str, Any]:
    """TrainableScheduleHook with a paramwise_cfg optimizer, against the reference whose optimizer
    was built with the parameter trainable and its gradient dropped until the change."""
    case = dict(model='AllUsed', frozen=['trunk.0.*'], flips=SCHEDULE_FLIPS)
    kw = dict(iters=iters, optimizer=SGD, optim_wrapper=PARAMWISE, val_interval=4, log_interval=50)
    tuned = scenarios.train('AllUsed', hook=dict(probe_iters=4), frozen=case['frozen'],
                            extra_hooks=[dict(type='TrainableScheduleHook', schedule=SCHEDULE)],
                            **kw)
    out = scenarios.compare_runs(tuned, reference(case, **kw))
    out['optimized'] = tuned['optimized']
    return out


def resume_across_change() -> Dict[str, Any]:
    """Checkpoint at 10 (after the unfreeze at 6, before the freeze at 12), resume to 16, and
    compare with 16 uninterrupted iterations (16 keep every run on the same 64 samples).

    Before mmengine 0.10.3 a resumed loop starts its data again from the first batch, so no resume
    matches an uninterrupted run: the reference is then the same resume under
    ``find_unused_parameters=True`` without DDPAutoTuneHook (the wrapper's other way of following
    the trainable set)."""
    shared = [tempfile.mkdtemp(prefix='mmddp_trainable_') if dist.get_rank() == 0 else None,
              tempfile.mkdtemp(prefix='mmddp_trainable_true_') if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(shared)  # checkpoints are written by rank 0 only
    schedule = [dict(at=6, unfreeze=['trunk.0.*']), dict(at=12, freeze=['head.*'])]
    kw = dict(frozen=['trunk.0.*'], optimizer=SGD, optim_wrapper=PARAMWISE,
              extra_hooks=[dict(type='TrainableScheduleHook', schedule=schedule)])
    tuned = dict(hook=dict(probe_iters=4), **kw)
    scenarios.train('AllUsed', iters=10, checkpoint_interval=5, work_dir=shared[0], **tuned)
    resumed = scenarios.train('AllUsed', iters=16, work_dir=shared[0], resume=True, **tuned)
    if resume_restores_data_position():
        straight = scenarios.train('AllUsed', iters=16, **tuned)
        straight['losses'] = straight['losses'][10:]
    else:
        scenarios.train('AllUsed', iters=10, checkpoint_interval=5, work_dir=shared[1],
                        find_unused=True, **kw)
        straight = scenarios.train('AllUsed', iters=16, work_dir=shared[1], resume=True,
                                   find_unused=True, **kw)
    return dict(resumed=resumed['digest'], straight=straight['digest'],
                resumed_losses=resumed['losses'], straight_losses=straight['losses'],
                resumed_log=resumed['trainable_log'])


def hand_unfreeze_with_paramwise() -> Dict[str, Any]:
    """A hand-written unfreeze of a parameter MMEngine's paramwise constructor skipped: an error."""
    return scenarios.train_plain('AllUsed', hook=dict(probe_iters=4), frozen=['trunk.0.*'],
                                 optimizer=SGD, optim_wrapper=PARAMWISE, iters=10,
                                 extra_hooks=[FlipRequiresGrad([(6, 'unfreeze', ['trunk.0.*'])])])


def user_ignored_param(iters: int = 40) -> Dict[str, Any]:
    """head.bias is one the user told DDP to ignore (it stays rank-local under plain DDP): the
    hook's guard and a trainable change must leave it rank-local too."""
    case = dict(model='RankOneBranch', frozen=['trunk.0.*'], flips=[(20, 'unfreeze', ['trunk.0.*'])])
    kw = dict(iters=iters, optimizer=SGD, val_interval=4, log_interval=50, ddp_ignore=['head.bias'])
    tuned = scenarios.train(case['model'], hook=dict(probe_iters=4), frozen=case['frozen'],
                            extra_hooks=[FlipRequiresGrad(case['flips'])], **kw)
    return scenarios.compare_runs(tuned, reference(case, **kw))
