"""The guard tells which parameters got a gradient in a backward also where ``.grad`` is set before it.

DDP's bucket-view gradients (``gradient_as_bucket_view=True``) kept between steps by
``zero_grad(set_to_none=False)`` are views of one bucket and share its version counter, so an
in-place accumulation into one of them looks like an arrival at all of them.
"""
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
