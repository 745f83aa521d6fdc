"""The control plane: a gloo side group per process group (made once, its connection checked), the
tree that integer reductions go up and down (:class:`ControlTree`), and the small exchanges over it.
CPU tensors and objects only: it never syncs CUDA."""
import datetime
import os
import socket
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from mmengine import dist as mmdist
from torch.distributed import ProcessGroup

from ..compat import set_group_timeout
from .groups import get_rank, group_rank, group_ranks, group_size, is_dist
from .store import store_agree

_CONTROL_GROUPS: Dict[Any, ProcessGroup] = {}


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
    """This rank's node: its host and the node's number where the launcher gives one (torchrun's
    ``GROUP_RANK``, slurm's ``SLURM_NODEID``), so nodes simulated on one host count apart. Not the
    rank minus ``LOCAL_RANK``: a node's ranks need not be consecutive (``srun --distribution=cyclic``)."""
    node = os.environ.get('GROUP_RANK', os.environ.get('SLURM_NODEID', ''))
    return f'{socket.gethostname()}/{node}'


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


def drop_groups() -> None:
    """Forget the side groups and their trees (teardown destroys every group)."""
    _CONTROL_GROUPS.clear()
    _TREES.clear()
