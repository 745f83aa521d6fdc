"""The guard tells which parameters got a gradient in a backward also where ``.grad`` is set before it.

DDP's bucket-view gradients (``gradient_as_bucket_view=True``) kept between steps by
``zero_grad(set_to_none=False)`` are views of one bucket and share its version counter, so an
in-place accumulation into one of them looks like an arrival at all of them.
"""
import sys
from collections import Counter
from typing import Dict, Tuple

import pytest
import torch
from torch import nn

from mmddp_hooks.ranks import run_distributed


class RankOneBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 4)
        self.branch = nn.Linear(4, 4)  # used on rank 1 only: zero-filled on rank 0
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        if torch.distributed.get_rank() == 1:
            h = h + self.branch(h)
        return self.head(h).square().mean()


def bucket_views_kept_between_steps(set_to_none: bool, accumulate: int):
    from torch.nn.parallel import DistributedDataParallel

    from mmddp_hooks.plan import DDPPlan
    from mmddp_hooks.wrapper import ReconfigurableDDP

    tuned = ReconfigurableDDP(RankOneBranch(), gradient_as_bucket_view=True)
    tuned.apply_plan(DDPPlan(False, fill={0: ['branch.weight', 'branch.bias']}))
    plain = DistributedDataParallel(RankOneBranch(), find_unused_parameters=True,
                                    gradient_as_bucket_view=True)
    runs = []
    for ddp in (tuned, plain):
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
        for step in range(6):
            for micro in range(accumulate):
                torch.manual_seed(100 * step + 10 * micro + torch.distributed.get_rank())
                last = micro == accumulate - 1
                with ddp.no_sync() if not last else torch.enable_grad():
                    loss = ddp(torch.randn(3, 4))
                    if ddp is tuned:
                        tuned.before_backward(loss)
                    loss.backward()
            if ddp is tuned:
                assert tuned.after_backward() is None  # usage as planned: nothing to change
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
        runs.append(torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()]))
    tuned.close_guard()
    return (runs[0] - runs[1]).abs().max().item()


REGIMES = [(False, 1), (False, 2), (True, 2)]  # (set_to_none, backwards per optimizer step)


def all_regimes():
    return [bucket_views_kept_between_steps(*regime) for regime in REGIMES]


@pytest.mark.dist
def test_rank_fixed_plan_with_bucket_view_gradients_trains_as_find_unused_true():
    """Zero-fill plan, bucket-view gradients: bit-equal to find_unused=True in every regime (one
    launch for all of them)."""
    diffs = run_distributed(all_regimes, 2, timeout=180)
    assert diffs == [[0.0] * len(REGIMES)] * 2, list(zip(REGIMES, *diffs))


class Linears(nn.Module):
    """``layers`` linear layers summed, and a head that never reaches the loss (the plan ignores
    it, the guard watches it)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(layers))
        self.unused_head = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(layer(x) for layer in self.layers).mean()


def guard_work(layers: int, set_to_none: bool, steps: int = 3) -> Dict[str, int]:
    """The guard's host work in ``steps`` planned steps after a warm-up one, counted on this rank:
    Python function calls in ``before_backward``, ``after_backward`` and ``after_step``
    (``sys.setprofile``), the record's hook calls in the backward, ``Tensor.__eq__`` calls, hooks
    registered, exchanges and the ints they carry. ``set_to_none=False``: gradients are zeros, not
    None, after each step."""
    from mmddp_hooks import dist as ddist
    from mmddp_hooks.plan import DDPPlan
    from mmddp_hooks.wrapper import ReconfigurableDDP

    torch.manual_seed(0)
    wrapper = ReconfigurableDDP(Linears(layers))
    wrapper.apply_plan(DDPPlan(False, ignore=['unused_head.weight', 'unused_head.bias']))
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=1e-3, momentum=0.9)
    counts = Counter()
    real = (ddist.all_reduce_flags, torch.Tensor.__eq__, torch.Tensor.register_hook,
            torch.Tensor.register_post_accumulate_grad_hook)

    def exchange(flags, *args, **kwargs):
        counts['exchanges'] += 1
        counts['exchanged_ints'] += flags.numel()
        return real[0](flags, *args, **kwargs)

    def eq(*args):
        counts['tensor_eq'] += 1
        return real[1](*args)

    def hook(*args):
        counts['hooks'] += 1
        return real[2](*args)

    def post_hook(*args):
        counts['hooks'] += 1
        return real[3](*args)

    def profile(frame, event, arg) -> None:
        counts['python_calls'] += event == 'call'

    def in_backward(frame, event, arg) -> None:
        counts['record_calls'] += event == 'call' and frame.f_code.co_name == '_arrive'

    def counted(method, *args, how=profile):
        sys.setprofile(how)
        try:
            return method(*args)
        finally:
            sys.setprofile(None)

    ddist.all_reduce_flags, torch.Tensor.__eq__ = exchange, eq
    torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook = hook, post_hook
    try:
        for step in range(1 + steps):
            if step == 1:  # after the first calls' imports and caches
                counts.clear()
            loss = wrapper(torch.randn(2, 8))
            counted(wrapper.before_backward, loss)
            counted(loss.backward, how=in_backward)
            change = counted(wrapper.after_backward)
            optimizer.step()
            optimizer.zero_grad(set_to_none=set_to_none)
            counted(wrapper.after_step, change)
            assert change is None, change
    finally:
        ddist.all_reduce_flags, torch.Tensor.__eq__ = real[:2]
        torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook = real[2:]
    watched = len(wrapper.guard.names)
    wrapper.close_guard()
    return dict(counts, watched=watched, steps=steps)


def guard_work_at_two_sizes() -> Dict[Tuple[int, bool], Dict[str, int]]:
    return {(layers, none): guard_work(layers, none) for layers in (75, 150) for none in (True, False)}


@pytest.mark.dist
def test_the_guard_s_host_work_per_step_is_counted_and_does_not_grow_in_python_per_parameter():
    """What made the guard's host work cost milliseconds (comparing each set gradient with None ran
    Tensor.__eq__: 8 ms a step at 300 parameters) is counted instead of timed: whether gradients
    are None or zeros after zero_grad, a planned step makes as many Python calls outside the
    backward at 302 watched tensors as at 152, and registers no hook; inside the backward, the
    record of arrival makes one call per parameter that gets a gradient (its hooks stay from the
    wrapper's construction); one int exchanged per step, no Tensor.__eq__."""
    for rank in run_distributed(guard_work_at_two_sizes, 2, timeout=180):
        for (layers, _), r in rank.items():
            assert r['watched'] == 2 * layers + 2, r
            assert r['exchanges'] == r['exchanged_ints'] == r['steps'] and 'tensor_eq' not in r, r
            assert 'hooks' not in r, r
            assert r['record_calls'] == r['steps'] * 2 * layers, r  # the unused head gets none
        for none in (True, False):
            small, large = rank[75, none], rank[150, none]
            assert small['python_calls'] == large['python_calls'], (none, small, large)
