"""Process-group set-up and teardown that work the same on CPU (gloo) and GPU (nccl).

MMEngine's own ``init_dist`` calls ``torch.cuda.set_device`` unconditionally, which fails on a CPU-only
machine, and ``destroy_process_group`` without a barrier makes gloo abort intermittently when one rank
tears down while another still has a collective in flight. Every tool and hook in this package goes
through these helpers instead.
"""
import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist

_ENV_KEYS = ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def is_dist() -> bool:
    """True when a process group is initialised (and usable)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def default_backend() -> str:
    """nccl where a GPU is visible, gloo otherwise. ``is_available`` never initialises CUDA."""
    return 'nccl' if torch.cuda.is_available() else 'gloo'


def init_dist_if_needed(backend: Optional[str] = None,
                        timeout_s: Optional[float] = None) -> bool:
    """Initialise the default process group from torchrun-style environment variables.

    Idempotent: returns True at once when a group already exists. Returns False, and does nothing,
    when the environment does not describe a distributed launch (no RANK/WORLD_SIZE), so the same
    entry point runs single-process. CUDA APIs are only touched for the nccl backend.

    Args:
        backend: 'gloo', 'nccl' or None to pick :func:`default_backend`.
        timeout_s: collective timeout in seconds (torch's default when None).
    """
    if is_dist():
        return True
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return False
    missing = [k for k in _ENV_KEYS if k not in os.environ]
    if missing:
        raise RuntimeError(
            f'init_dist_if_needed: RANK and WORLD_SIZE are set but {", ".join(missing)} '
            f'{"is" if len(missing) == 1 else "are"} not; launch with torchrun or set them all.')
    backend = backend or default_backend()
    rank = int(os.environ['RANK'])
    world_size = int(os.environ['WORLD_SIZE'])
    local_rank = int(os.environ.get('LOCAL_RANK', rank))
    if backend == 'nccl':
        torch.cuda.set_device(local_rank)
    kwargs = {}
    if timeout_s is not None:
        kwargs['timeout'] = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return True


def teardown() -> None:
    """Destroy the default process group after a barrier, so no rank leaves a peer mid-collective."""
    if not is_dist():
        return
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward *sums* the gradient over ranks, then takes this
    rank's rows. Every rank's loss depends on every gathered row, so the gradient of a rank's
    rows is the sum of all ranks' contributions; returning only ``grads[rank]`` (the widely copied
    GatherLayer) drops the other ranks' terms."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        sizes_list = [int(s.item()) for s in sizes]
        max_rows = max(sizes_list)
        padded = x.new_zeros((max_rows, *x.shape[1:]))
        padded[:x.shape[0]] = x
        chunks = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(chunks, padded.contiguous())
        ctx.sizes = sizes_list
        ctx.rank = dist.get_rank()
        return torch.cat([c[:n] for c, n in zip(chunks, sizes_list)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 (sizes may differ), differentiably.

    Identity when no process group is initialised or the world has one rank.
    """
    if not is_dist() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a (detached) tensor over ranks; the tensor itself where there is no group."""
    x = x.detach().clone()
    if is_dist():
        dist.all_reduce(x)
    return x
