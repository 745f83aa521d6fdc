"""The c10d store as a channel beside the collectives: :func:`store_agree`, an exchange that waits a
bounded time (a collective would wait for ever on a rank that has nothing to say)."""
import datetime
import hashlib
import pickle
import time
from typing import Any, Dict, List, Optional

import torch.distributed as dist
from torch.distributed import ProcessGroup

from ..compat import store_get
from .groups import get_rank, group_ranks, is_dist


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
    arrivals, one wait, and one more per 2 :data:`WAIT_SLICE_S` a rank waits); the ranks' values are read
    only when they differ or some are missing. ``tag`` must be new for every exchange (the store
    keeps keys).
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
        _wait(kv, f'{base}/done', timeout_s)
    except Exception as e:  # DistStoreError (torch >= 2.2) or RuntimeError: a timeout
        posted = _posted(kv, base, ranks)
        raise StoreTimeout([r for r in ranks if r not in posted], posted) from e
    if kv.add(same, 0) == len(ranks):
        return None
    posted = _posted(kv, base, ranks)  # equal values can pickle apart (a set's order): compare them
    return None if all(v == value for v in posted.values()) else posted


WAIT_SLICE_S = 0.05  # the longest a wait holds the store's client, which the watchdog's thread shares


def _wait(kv: Any, key: str, timeout_s: float) -> None:
    """Wait for ``key`` up to ``timeout_s``, in waits of at most :data:`WAIT_SLICE_S` with as long a
    pause after each: a client serves one request at a time, and one long wait would keep the
    watchdog's heartbeats and its stack from the store (the hang report would then call this rank
    unreachable). An exchange done within the first slice costs one wait."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            kv.wait([key], datetime.timedelta(seconds=max(min(WAIT_SLICE_S, left), 0.001)))
            return
        except Exception as e:  # a timeout (DistStoreError or RuntimeError), or the store is gone
            if 'timeout' not in str(e).lower() or time.monotonic() >= deadline:
                raise
        time.sleep(WAIT_SLICE_S)  # the client is free: the watchdog's requests go through


def _posted(kv: Any, base: str, ranks: List[int]) -> Dict[int, Any]:
    """What each rank posted under ``base`` (the rare path: ``O(N)`` reads)."""
    found = {r: store_get(kv, f'{base}/{r}') for r in ranks}
    return {r: pickle.loads(v) for r, v in found.items() if v is not None}
