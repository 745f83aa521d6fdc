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
import hashlib
import os
import pickle
import socket
import subprocess
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from mmengine import dist as mmdist
from torch.distributed import ProcessGroup

from .compat import set_group_timeout, store_get

_ENV_KEYS = ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def is_dist() -> bool:
    """True when a process group is initialised (and usable)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def backend_in_use() -> Optional[str]:
    """The default process group's backend ('nccl', 'gloo', ...), None without one."""
    return dist.get_backend() if is_dist() else None


def default_backend() -> str:
    """nccl where a GPU is visible, gloo otherwise. ``is_available`` never initialises CUDA."""
    return 'nccl' if torch.cuda.is_available() else 'gloo'


def slurm_env(environ: Dict[str, str]) -> Dict[str, str]:
    """The torchrun-style variables of an ``srun`` task, as MMEngine's slurm init derives them.

    RANK from SLURM_PROCID, WORLD_SIZE from SLURM_NTASKS, LOCAL_RANK from SLURM_LOCALID;
    MASTER_ADDR (where unset) is the first host of SLURM_NODELIST (``scontrol show hostname``),
    MASTER_PORT (where unset) 29500, torch's default: only those two keep a value already set.
    """
    missing = [k for k in ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST') if k not in environ]
    if missing:
        raise RuntimeError(f'--launcher slurm: {", ".join(missing)} not set; start the job with '
                           'srun (tools/slurm_train.sh does)')
    env = dict(RANK=environ['SLURM_PROCID'], WORLD_SIZE=environ['SLURM_NTASKS'],
               LOCAL_RANK=environ.get('SLURM_LOCALID', '0'),
               MASTER_PORT=environ.get('MASTER_PORT', '29500'))
    env['MASTER_ADDR'] = environ.get('MASTER_ADDR') or subprocess.run(
        ['scontrol', 'show', 'hostname', environ['SLURM_NODELIST']], capture_output=True,
        text=True, check=True).stdout.split()[0]
    return env


def init_dist_if_needed(backend: Optional[str] = None,
                        timeout_s: Optional[float] = None, launcher: str = 'pytorch') -> bool:
    """Initialise the default process group from torchrun-style (or slurm) environment variables.

    Idempotent: returns True at once when a group already exists. Returns False, and does nothing,
    when the environment does not describe a distributed launch (no RANK/WORLD_SIZE), so the same
    entry point runs single-process. CUDA APIs are only touched for the nccl backend.

    Args:
        backend: 'gloo', 'nccl' or None to pick :func:`default_backend`.
        timeout_s: collective timeout in seconds (torch's default when None).
        launcher: 'pytorch' (torchrun's variables) or 'slurm' (an ``srun`` task's, turned into
            those by :func:`slurm_env`; MMEngine's own slurm init calls ``torch.cuda.set_device``
            even without a GPU).
    """
    if is_dist():
        return True
    if launcher == 'slurm':
        os.environ.update(slurm_env(dict(os.environ)))
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

    Before torch 2.8 a group's destructor joins those threads *holding* the GIL (pytorch#154976).
    A worker that finished a collective just before the barrier, and drops that collective's
    Python-owned tensor right after, waits for the GIL: the destructor then waits for it for ever
    (seen on torch 2.1.2: a rank stuck in ``destroy_process_group`` after its peer had exited). The
    short sleep after the barrier releases the GIL, so such a worker can finish before any group
    is destroyed: it narrows that window, it cannot close it (only torch's fix does).
    """
    if not is_dist():
        return
    try:
        barrier()  # on the control plane: the default group may not serve CPU tensors
        time.sleep(_WORKER_DRAIN_S)
    finally:
        _CONTROL_GROUPS.clear()
        _TREES.clear()
        dist.destroy_process_group()
        gc.collect()


_WORKER_DRAIN_S = 0.02


# ------------------------------------------------------------------------------------ control plane
_CONTROL_GROUPS: Dict[Any, ProcessGroup] = {}


def group_size(group: Optional[ProcessGroup] = None) -> int:
    return dist.get_world_size(group) if is_dist() else 1


def group_ranks(group: Optional[ProcessGroup] = None) -> List[int]:
    """The global ranks of ``group`` (the default group's when None)."""
    return dist.get_process_group_ranks(group) if group is not None else list(range(get_world_size()))


def group_rank(group: Optional[ProcessGroup] = None) -> int:
    return dist.get_rank(group) if is_dist() else 0


def control_group(group: Optional[ProcessGroup] = None) -> ProcessGroup:
    """The gloo group for control traffic among the ranks of ``group`` (made once, then cached).

    A collective the first time for a given group: ``ReconfigurableDDP`` makes it when it wraps,
    where every rank of its group is at the same point. A control plane that cannot connect fails
    there, naming ``GLOO_SOCKET_IFNAME`` (:func:`_gloo_connects`), instead of hanging at the
    first step.
    """
    key = group if group is not None else dist.group.WORLD
    if key not in _CONTROL_GROUPS:
        whole = group is None or key is dist.group.WORLD
        # only a subgroup's ranks reach here: the others must not be waited for
        kwargs = {} if whole else dict(ranks=dist.get_process_group_ranks(key),
                                       use_local_synchronization=True)
        _CONTROL_GROUPS[key] = _gloo_connects(group if not whole else None, kwargs)
    return _CONTROL_GROUPS[key]


GLOO_CONNECT_TIMEOUT_S = 60.0
_CONNECT_CHECKS: Dict[tuple, int] = {}  # per set of ranks: only a subgroup's ranks check it


def _gloo_connects(group: Optional[ProcessGroup], kwargs: dict) -> ProcessGroup:
    """A gloo group connected with a short timeout, once every rank has arrived, then given
    torch's default timeout for its collectives.

    Gloo connects through the interface ``GLOO_SOCKET_IFNAME`` names, else the one this host's name
    resolves to: on a multi-NIC cluster node that can be one the other nodes cannot reach, and a
    group would then wait for its full timeout (30 min) to say only "timed out". The arrival goes
    through the c10d store (which the default group already reached), within torch's default
    process-group timeout, so a rank that comes late is not taken for one that cannot connect.
    Making a gloo group costs every rank about 3 store requests per rank of the group (its
    connections' rendezvous), so the check connects the control group itself; only where torch
    cannot change a group's timeout (before 2.3) is it a throwaway group made first.
    """
    ranks = tuple(group_ranks(group))
    serial = _CONNECT_CHECKS[ranks] = _CONNECT_CHECKS.get(ranks, -1) + 1
    default = dist.distributed_c10d.default_pg_timeout
    store_agree(f'gloo-connect/{"-".join(map(str, ranks))}/{serial}', True, group,
                timeout_s=default.total_seconds())
    try:
        connected = dist.new_group(backend='gloo', timeout=datetime.timedelta(
            seconds=GLOO_CONNECT_TIMEOUT_S), **kwargs)
        dist.barrier(group=connected)
    except RuntimeError as e:
        raise RuntimeError(gloo_connect_message(e)) from e
    if set_group_timeout(connected, default):
        return connected
    real = dist.new_group(backend='gloo', **kwargs)
    dist.destroy_process_group(connected)  # after: a subgroup's name could be reused otherwise
    return real


def gloo_connect_message(error: Exception) -> str:
    """What to tell a user whose gloo control plane could not connect."""
    ifname = os.environ.get('GLOO_SOCKET_IFNAME')
    now = (f'GLOO_SOCKET_IFNAME={ifname}' if ifname else
           f'GLOO_SOCKET_IFNAME is not set, so gloo used the address of this host\'s name '
           f'({socket.gethostname()})')
    names = ', '.join(name for _, name in socket.if_nameindex())
    return (f'mmddp_hooks: rank {get_rank()} could not connect the gloo control plane (the side '
            f'group the guard, the probe and the replica check talk over): {error}\n'
            f'{now}. On every node set GLOO_SOCKET_IFNAME to the network interface the nodes reach '
            f'each other through (usually the one NCCL_SOCKET_IFNAME names). This node has: {names}; '
            f'`ip -o -4 addr` shows their addresses.')


def all_gather_object(obj: Any, group: Optional[ProcessGroup] = None) -> List[Any]:
    """Every rank's ``obj`` (control plane, synchronous); ``[obj]`` without a process group."""
    if not is_dist():
        return [obj]
    return mmdist.all_gather_object(obj, group=control_group(group))


def all_reduce_flags(flags: torch.Tensor, group: Optional[ProcessGroup] = None,
                     op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce a small CPU integer tensor in place over the control tree (synchronous); returns it.

    ``op``: ``ReduceOp.SUM`` or ``ReduceOp.MAX``. Nothing is sent in a group of one rank.
    """
    if flags.device.type != 'cpu':
        raise ValueError(f'control flags must be CPU tensors (got {flags.device}): the control '
                         'plane is gloo, and reading CUDA flags would sync the host every step')
    if flags.numel() and is_dist() and group_size(group) > 1:
        control_tree(group).all_reduce(flags, op)
    return flags


def row_counts(n: int, group: Optional[ProcessGroup] = None) -> List[int]:
    """Every rank's ``n`` (a host int, e.g. a batch's row count): control plane, no CUDA sync."""
    if not is_dist():
        return [n]
    counts = torch.zeros(group_size(group), dtype=torch.long)
    counts[group_rank(group)] = n
    all_reduce_flags(counts, group)
    return counts.tolist()


# ------------------------------------------------------------------------------ the control tree
_TREES: Dict[Any, 'ControlTree'] = {}


def node_key() -> str:
    """This rank's node: its host and, where ``LOCAL_RANK`` is set (torchrun, slurm), the node's
    first rank, since those launchers number a node's ranks contiguously. Nodes simulated on one
    host (``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` as torchrun sets them) count apart."""
    local = os.environ.get('LOCAL_RANK')
    first = get_rank() - int(local) if local is not None and is_dist() else ''
    return f'{socket.gethostname()}/{first}'


def tree_links(keys: Sequence[str], ranks: Sequence[int],
               me: int) -> Tuple[Optional[int], List[int]]:
    """``me``'s parent (None at the root) and children in the control tree over ``ranks``
    (``keys[i]``: ``ranks[i]``'s node): a binary tree within each node rooted at the node's first
    rank, and a binary tree over those first ranks. A reduction up and back down the tree crosses
    ``2 * floor(log2(ranks in a node))`` local links and ``2 * floor(log2(nodes))`` links between
    nodes, whatever the number of ranks; each rank talks to at most 5 others."""
    nodes: Dict[str, List[int]] = {}
    for key, rank in zip(keys, ranks):
        nodes.setdefault(key, []).append(rank)
    members = nodes[keys[list(ranks).index(me)]]
    parent, children = _heap_links(members, me)
    if me == members[0]:  # the node's leader: its parent and further children are leaders
        parent, leaders = _heap_links([m[0] for m in nodes.values()], me)
        children = children + leaders
    return parent, children


def _heap_links(members: List[int], me: int) -> Tuple[Optional[int], List[int]]:
    i = members.index(me)
    return (members[(i - 1) // 2] if i else None,
            [members[j] for j in (2 * i + 1, 2 * i + 2) if j < len(members)])


_FOLD = {dist.ReduceOp.SUM: np.add, dist.ReduceOp.MAX: np.maximum}


class ControlTree:
    """Reduce small integer vectors over a group's control plane along :func:`tree_links`.

    gloo's own all-reduce is a ring: ``2 (N - 1)`` hops one after another, one per rank, so a
    per-step exchange over it grows with the number of ranks. Up and down a tree the latency grows
    as ``log N``, and a rank sends and receives at most 5 messages of the vector's size, whatever N.
    Point-to-point messages on the gloo side group (in one order on every rank): no collective of
    the data plane, no CUDA. The tree is made once per group; the node keys are gathered once (a
    one-off ``O(N)`` exchange of short strings).
    """

    def __init__(self, group: Optional[ProcessGroup] = None) -> None:
        self.pg = control_group(group)
        self.keys = all_gather_object(node_key(), group)
        self.parent, self.children = tree_links(self.keys, group_ranks(group), get_rank())
        self._scratch: Dict[tuple, List[torch.Tensor]] = {}

    def all_reduce(self, flags: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce ``flags`` (a contiguous CPU integer tensor, the same shape on every rank) in
        place: the children's partial results up, the total back down."""
        fold, mine = _FOLD[op], flags.numpy()
        key = (tuple(flags.shape), flags.dtype)
        if key not in self._scratch:
            self._scratch[key] = [torch.empty_like(flags) for _ in self.children]
        bufs = self._scratch[key]
        works = [dist.irecv(b, c, group=self.pg) for b, c in zip(bufs, self.children)]
        for work, buf in zip(works, bufs):
            work.wait()
            fold(mine, buf.numpy(), out=mine)
        if self.parent is not None:
            dist.send(flags, self.parent, group=self.pg)
            dist.recv(flags, self.parent, group=self.pg)
        for work in [dist.isend(flags, c, group=self.pg) for c in self.children]:
            work.wait()
        return flags


def control_tree(group: Optional[ProcessGroup] = None) -> ControlTree:
    """The group's :class:`ControlTree` (made once, a collective: every rank of ``group`` calls)."""
    key = group if group is not None else dist.group.WORLD
    if key not in _TREES:
        _TREES[key] = ControlTree(group)
    return _TREES[key]


def barrier(group: Optional[ProcessGroup] = None) -> None:
    """Wait for every rank of ``group`` (control plane)."""
    if is_dist():
        dist.barrier(group=control_group(group))


class StoreTimeout(RuntimeError):
    """Some ranks did not post to :func:`store_agree` in time (``missing``: their ranks)."""

    def __init__(self, missing: List[int], posted: Dict[int, Any]) -> None:
        super().__init__(f'ranks {missing} posted nothing')
        self.missing, self.posted = missing, posted


def store() -> Any:
    """The default process group's c10d store: a channel beside the collectives, which keeps
    working while they hang (heartbeats, and exchanges a collective could wait on for ever)."""
    return dist.distributed_c10d._get_default_store()


def store_agree(tag: str, value: Any, group: Optional[ProcessGroup] = None,
                timeout_s: float = 30.0) -> Optional[Dict[int, Any]]:
    """Whether every rank of ``group`` posts the same ``value`` to the c10d store: None when they
    all do, else ``{global rank: value}``; :class:`StoreTimeout` after ``timeout_s``.

    For a rank that noticed something on its own (no collective runs every step to tell it that
    the others did too): a rank that posts waits at most ``timeout_s`` for the others, where a
    collective would wait for ever on a rank that has nothing to say. Each rank makes the same
    six store requests whatever the number of ranks (a count of each distinct value, a count of
    arrivals, one wait); the ranks' values are read only when they differ or some are missing.
    ``tag`` must be new for every exchange (the store keeps keys).
    """
    if not is_dist():
        return None
    kv, ranks = store(), group_ranks(group)
    base = f'mmddp_hooks/{tag}'
    data = pickle.dumps(value)
    same = f'{base}/value/{hashlib.sha1(data).hexdigest()}'
    kv.set(f'{base}/{get_rank()}', data)
    kv.add(same, 1)  # before the arrival: once every rank arrived, every value is counted
    if kv.add(f'{base}/arrived', 1) == len(ranks):
        kv.set(f'{base}/done', b'')
    try:
        kv.wait([f'{base}/done'], datetime.timedelta(seconds=timeout_s))
    except Exception as e:  # DistStoreError (torch >= 2.2) or RuntimeError: a timeout
        posted = _posted(kv, base, ranks)
        raise StoreTimeout([r for r in ranks if r not in posted], posted) from e
    return None if kv.add(same, 0) == len(ranks) else _posted(kv, base, ranks)


def _posted(kv: Any, base: str, ranks: List[int]) -> Dict[int, Any]:
    """What each rank posted under ``base`` (the rare path: ``O(N)`` reads)."""
    found = {r: store_get(kv, f'{base}/{r}') for r in ranks}
    return {r: pickle.loads(v) for r, v in found.items() if v is not None}


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
