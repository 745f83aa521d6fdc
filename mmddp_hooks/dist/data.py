"""The data plane: collectives on the wrapper's ``process_group``, with tensors on their own device
(InfoNCE gathers, hand-averaged gradients, loss sums)."""
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .control import row_counts
from .groups import group_rank, group_size, is_dist


def all_reduce_(x: torch.Tensor, group: Optional[ProcessGroup] = None,
                op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce ``x`` in place over ``group`` on ``x``'s own device (data plane); returns ``x``."""
    if is_dist():
        dist.all_reduce(x, op=op, group=group)
    return x


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward *sums* the gradient over ranks, then takes this
    rank's rows. Every rank's loss depends on every gathered row, so the gradient of a rank's
    rows is the sum of all ranks' contributions; returning only ``grads[rank]`` (the widely copied
    GatherLayer) drops the other ranks' terms. Row counts come in as host ints: no device sync."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: List[int], group: Optional[ProcessGroup]) -> torch.Tensor:
        ctx.sizes, ctx.group, ctx.rank = sizes, group, group_rank(group)
        return gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = all_reduce_(grad.contiguous().clone(), ctx.group)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


def gather_rows(x: torch.Tensor, sizes: Sequence[int],
                group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` (``sizes[r]`` rows on rank ``r``) along dim 0, no autograd."""
    if not is_dist() or group_size(group) == 1:
        return x
    max_rows = max(sizes)
    padded = x if x.shape[0] == max_rows else torch.cat(
        [x, x.new_zeros((max_rows - x.shape[0], *x.shape[1:]))])
    chunks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded.contiguous(), group=group)
    return torch.cat([c[:n] for c, n in zip(chunks, sizes)])


def gather_with_grad(x: torch.Tensor, sizes: Optional[Sequence[int]] = None,
                     group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 (sizes may differ), differentiably.

    ``sizes``: every rank's row count, when the caller knows them (see :func:`row_counts`); else
    they are exchanged here. Identity when no process group is initialised or the group has one rank.
    """
    if not is_dist() or group_size(group) == 1:
        return x
    sizes = list(sizes) if sizes is not None else row_counts(x.shape[0], group)
    return _GatherWithGrad.apply(x, sizes, group)
