"""Where "did this parameter get a gradient" was read three ways and the readings disagreed (#41).

Each case trains one model through a Runner with DDPAutoTuneHook and as plain
``MMDistributedDataParallel(find_unused_parameters=True)`` from the same seeds, SGD with momentum
and weight decay (a zero gradient then moves a parameter that ``None`` leaves alone), and records
before every optimizer step which ``.grad`` are ``None``: the tests compare both, step by step.
"""
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from torch import nn

import scenarios
from scenarios import DIM, ScenarioModel

ITERS = 24
SGD = dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=1e-2)


class _AffineNoneGrad(torch.autograd.Function):
    """``x @ w.T + b`` whose backward returns ``None`` for ``w`` and ``b`` when ``drop``: a custom
    Function's habit. The engine still runs their AccumulateGrad (DDP's hook fires) with nothing."""

    @staticmethod
    def forward(ctx, x, w, b, drop):
        ctx.save_for_backward(x, w)
        ctx.drop = drop
        return x @ w.t() + b

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        if ctx.drop:
            return g @ w, None, None, None
        return g @ w, g.t() @ x, g.sum(0), None


class NoneGradHead(ScenarioModel):
    """The head's backward returns ``None`` from training forward ``START`` on (after the probe)."""

    START = 7

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(DIM, DIM)

    def skips_extra(self) -> bool:
        return False

    def forward(self, inputs, target=None, index=None, mode='loss'):
        h = self.trunk(inputs)
        if not (mode == 'loss' and self.skips_extra()):
            h = h + self.extra(h)
        drop = mode == 'loss' and self.steps >= self.START
        out = _AffineNoneGrad.apply(h, self.head.weight, self.head.bias, drop)
        self.calls += 1
        if mode == 'loss':
            self.steps += 1
            return dict(loss=((out - target) ** 2).mean())
        return out


class NoneGradHeadInProbe(NoneGradHead):
    """The same, from the second training forward on: inside the probe."""

    START = 1


class NoneGradHeadRankSkip(NoneGradHead):
    """The same, and rank 1 also leaves ``extra`` without a gradient in one step after the probe."""

    def skips_extra(self) -> bool:
        return dist.get_rank() == 1 and self.steps == 9


class TiedOneAliasIgnored(ScenarioModel):
    """A weight tied under two names; the user told DDP to ignore one alias only (DDP keeps it)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(DIM, DIM)
        self.decoder = nn.Linear(DIM, DIM)
        self.decoder.weight = self.encoder.weight

    def branch(self, h, index):
        return self.decoder(torch.relu(self.encoder(h)))


class PartialBN(ScenarioModel):
    """mmaction2's ``partial_bn``: ``train()`` puts every BatchNorm but the first in eval mode and
    freezes its affine parameters, after DDP was built. (The first one keeps no running
    statistics: each rank's own would make the replicas' states differ, under plain DDP too.)"""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(DIM, DIM), nn.BatchNorm1d(DIM, track_running_stats=False),
                                   nn.ReLU(),
                                   nn.Linear(DIM, DIM), nn.BatchNorm1d(DIM), nn.ReLU(),
                                   nn.Linear(DIM, DIM), nn.BatchNorm1d(DIM))

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            norms = [m for m in self.modules() if isinstance(m, nn.BatchNorm1d)]
            for m in norms[1:]:
                m.eval()
                m.weight.requires_grad = False
                m.bias.requires_grad = False
        return self


for _cls in (NoneGradHead, NoneGradHeadInProbe, NoneGradHeadRankSkip, TiedOneAliasIgnored,
             PartialBN):
    scenarios.MODELS[_cls.__name__] = _cls


@OPTIM_WRAPPERS.register_module(force=True)
class KeepGradTensors(OptimWrapper):
    """``zero_grad(set_to_none=False)``: gradients stay zero tensors between steps."""

    def zero_grad(self, **kwargs) -> None:
        self.optimizer.zero_grad(set_to_none=False)


class GradNoneRecorder(Hook):
    """Before every optimizer step: the names whose ``.grad`` is ``None``."""

    def __init__(self) -> None:
        self.steps: List[List[str]] = []

    def before_train(self, runner) -> None:
        module = runner.model.module if hasattr(runner.model, 'module') else runner.model
        named = list(module.named_parameters())

        def record(optimizer, args, kwargs) -> None:
            self.steps.append([n for n, p in named if p.grad is None])
        runner.optim_wrapper.optimizer.register_step_pre_hook(record)


# model; optimizer-wrapper keys; ddp_ignore
CASES: Dict[str, Dict[str, Any]] = {
    'none_grad_after_probe': dict(model='NoneGradHead'),
    'none_grad_rank_skip': dict(model='NoneGradHeadRankSkip'),
    'none_grad_in_probe': dict(model='NoneGradHeadInProbe'),
    'set_to_none_false': dict(model='RankOneBranch', optim_wrapper=dict(type='KeepGradTensors')),
    'tied_one_alias_ignored': dict(model='TiedOneAliasIgnored', ddp_ignore=['decoder.weight']),
    'partial_bn': dict(model='PartialBN'),
}


def run_arrival(names: List[str], iters: int = ITERS) -> Dict[str, Dict[str, Any]]:
    """On every rank: each case with the hook, then as plain DDP with True; what the tests compare."""
    out = {}
    for name in names:
        case = CASES[name]
        runs = []
        for hook in (dict(probe_iters=4), None):
            recorder = GradNoneRecorder()
            run = scenarios.train(case['model'], hook=hook, find_unused=hook is None, iters=iters,
                                  optimizer=SGD, optim_wrapper=case.get('optim_wrapper'),
                                  ddp_ignore=case.get('ddp_ignore', ()), val_interval=4,
                                  log_interval=50, extra_hooks=[recorder])
            run['none_grads'] = recorder.steps
            runs.append(run)
        tuned, reference = runs
        row = scenarios.compare_runs(tuned, reference)
        row.update(none_grads=tuned['none_grads'], reference_none_grads=reference['none_grads'])
        out[name] = row
    return out


class _UnfinalizedOnRank1:
    """A reducer that rank 1 can never complete (what the rescue cannot mend)."""

    def _check_reducer_finalized(self) -> None:
        if dist.get_rank() == 1:
            raise RuntimeError('Expected to have finished reduction in the prior iteration before '
                               'starting a new one. Parameter indices which did not receive grad '
                               'for rank 1: 0')


def unfinalized_on_one_rank() -> Dict[str, Any]:
    """Each rank catches what the guard raised, then joins one more collective: none may still
    be waiting in the guard's own exchange for a rank that raised."""
    from mmddp_hooks.guard import PlanGuard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    guard = PlanGuard(model, fill=[], ignore=[])
    loss = model(torch.randn(2, 4)).sum()
    guard.before_backward(loss)
    loss.backward()
    try:
        guard.after_backward(_UnfinalizedOnRank1())
        raised = ''
    except RuntimeError as e:
        raised = str(e)
    guard.close()
    dist.barrier()
    return dict(rank=dist.get_rank(), raised=raised)
