"""Every collective of this package, with an explicit group and device (as detectron2's ``comm``).

Two planes, because NCCL serves CUDA tensors only:

* **control** (usage records, guard flags, digests, partition checks, row counts): CPU tensors and
  objects over a gloo side group made once for the ranks of the DDP wrapper's ``process_group`` and
  cached: a group of its own even where the wrapper's group is gloo, so the guard's flag exchange,
  launched asynchronously at the end of backward, runs beside DDP's last bucket all-reduces instead
  of in line behind them (and in any order relative to them). Never syncs CUDA.
* **data** (InfoNCE gathers, hand-averaged gradients, loss sums): the wrapper's ``process_group``,
  with tensors on their own device.

``group=None`` everywhere means the default group. Set-up and teardown work the same on CPU (gloo)
and GPU (nccl): MMEngine's ``init_dist`` calls ``torch.cuda.set_device`` unconditionally, which fails
on a CPU-only machine; teardown finishes outstanding control work and drops the side groups.
"""
import datetime
import gc
import os
import pickle
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from mmengine import dist as mmdist
from torch.distributed import ProcessGroup

from .compat import store_has

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
    """Destroy every process group after a barrier, and join its threads before the process exits.

    ``destroy_process_group`` only unregisters a group that something still references, and a
    finished Runner does (its DDP wrapper's reducer, in a reference cycle). The group's gloo worker
    threads then live on into interpreter shutdown, where one that drops the last reference to a
    Python-owned tensor must take the GIL, is ended by the finalising interpreter, and aborts the
    rank ("terminate called without an active exception") after its work was done. Collecting that
    garbage here destroys the group while Python is alive: its threads are joined first. Callers drop
    their own references (``del runner``) before calling this.
    """
    if not is_dist():
        return
    try:
        barrier()  # on the control plane: the default group may not serve CPU tensors
    finally:
        _CONTROL_GROUPS.clear()
        dist.destroy_process_group()
        gc.collect()


# ------------------------------------------------------------------------------------ control plane
_CONTROL_GROUPS: Dict[Any, ProcessGroup] = {}


def group_size(group: Optional[ProcessGroup] = None) -> int:
    return dist.get_world_size(group) if is_dist() else 1


def group_rank(group: Optional[ProcessGroup] = None) -> int:
    return dist.get_rank(group) if is_dist() else 0


def control_group(group: Optional[ProcessGroup] = None) -> ProcessGroup:
    """The gloo group for control traffic among the ranks of ``group`` (made once, then cached).

    A collective the first time for a given group: ``ReconfigurableDDP`` makes it when it wraps,
    where every rank of its group is at the same point.
    """
    key = group if group is not None else dist.group.WORLD
    if key not in _CONTROL_GROUPS:
        if group is None or key is dist.group.WORLD:
            _CONTROL_GROUPS[key] = dist.new_group(backend='gloo')
        else:  # only this group's ranks reach here; the others must not be waited for
            _CONTROL_GROUPS[key] = dist.new_group(ranks=dist.get_process_group_ranks(key),
                                                  backend='gloo', use_local_synchronization=True)
    return _CONTROL_GROUPS[key]


def all_gather_object(obj: Any, group: Optional[ProcessGroup] = None) -> List[Any]:
    """Every rank's ``obj`` (control plane, synchronous); ``[obj]`` without a process group."""
    if not is_dist():
        return [obj]
    return mmdist.all_gather_object(obj, group=control_group(group))


def all_reduce_flags(flags: torch.Tensor, group: Optional[ProcessGroup] = None,
                     op: Any = dist.ReduceOp.SUM, async_op: bool = False) -> Optional[Any]:
    """Reduce a small CPU tensor in place over the control plane; the Work when ``async_op``."""
    if flags.device.type != 'cpu':
        raise ValueError(f'control flags must be CPU tensors (got {flags.device}): the control '
                         'plane is gloo, and reading CUDA flags would sync the host every step')
    if not is_dist():
        return None
    return dist.all_reduce(flags, op=op, group=control_group(group), async_op=async_op)


def row_counts(n: int, group: Optional[ProcessGroup] = None) -> List[int]:
    """Every rank's ``n`` (a host int, e.g. a batch's row count): control plane, no CUDA sync."""
    if not is_dist():
        return [n]
    counts = torch.zeros(group_size(group), dtype=torch.long)
    counts[group_rank(group)] = n
    all_reduce_flags(counts, group)
    return counts.tolist()


def barrier(group: Optional[ProcessGroup] = None) -> None:
    """Wait for every rank of ``group`` (control plane)."""
    if is_dist():
        dist.barrier(group=control_group(group))


class StoreTimeout(RuntimeError):
    """Some ranks did not post to :func:`store_exchange` in time (``missing``: their ranks)."""

    def __init__(self, missing: List[int], posted: Dict[int, Any]) -> None:
        super().__init__(f'ranks {missing} posted nothing')
        self.missing, self.posted = missing, posted


def store() -> Any:
    """The default process group's c10d store: a channel beside the collectives, which keeps
    working while they hang (heartbeats, and exchanges a collective could wait on for ever)."""
    return dist.distributed_c10d._get_default_store()


def store_exchange(tag: str, value: Any, group: Optional[ProcessGroup] = None,
                   timeout_s: float = 30.0) -> Dict[int, Any]:
    """Every rank's ``value`` through the c10d store, or :class:`StoreTimeout` after ``timeout_s``.

    For a rank that noticed something on its own (no collective runs every step to tell it that
    the others did too): a rank that posts waits at most ``timeout_s`` for the others, where a
    collective would wait for ever on a rank that has nothing to say. ``tag`` must be new for every
    exchange (the store keeps keys). Returns ``{global rank: value}`` over ``group``'s ranks.
    """
    if not is_dist():
        return {0: value}
    kv = store()
    ranks = dist.get_process_group_ranks(group) if group is not None else range(get_world_size())
    keys = {r: f'mmddp_hooks/{tag}/{r}' for r in ranks}
    kv.set(keys[get_rank()], pickle.dumps(value))
    try:
        kv.wait(list(keys.values()), datetime.timedelta(seconds=timeout_s))
    except Exception as e:  # DistStoreError (torch >= 2.2) or RuntimeError: a timeout
        posted = {r: pickle.loads(kv.get(k)) for r, k in keys.items() if store_has(kv, k)}
        raise StoreTimeout([r for r in ranks if r not in posted], posted) from e
    return {r: pickle.loads(kv.get(k)) for r, k in keys.items()}


# --------------------------------------------------------------------------------------- data plane
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
