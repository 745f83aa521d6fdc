"""The hang watchdog's protocol over the c10d store, at the same cost per rank on 4 ranks or 1024.

Every rank runs a watcher thread (:class:`HangWatcher`; ``HangWatchdogHook`` wires it to the Runner).
Once per ``interval`` it makes four store requests, whatever the number of ranks:

1. post its heartbeat: iteration, phase, a count of progress marks, the time (one ``set``);
2. read the heartbeat of the next rank, in ring order (a ``get``: torch sends a wait and a get);
3. read the alarm counter of the current round (an ``add`` of 0: one round trip, on every torch).

A rank whose progress count stays still for the timeout, as the rank before it sees it on its own
clock, raises the alarm. In a hang every rank stops progressing (the others wait for the straggler in
a collective), so the alarm comes within an interval of the timeout. Then, once per alarm:

* every live rank posts its main thread's stack and counts itself in (a ``set``, an ``add``);
* the first to count itself as the reporter (an ``add``) reads every heartbeat and stack: ``O(N)``
  requests, once per hang, on one rank; it writes one report (the straggler named with
  ``file:line``, the others grouped by what they wait in, the silent ranks named dead or
  unreachable) to the log, ``work_dir`` and the store;
* the others poll for that report (a ``check`` every 0.2 s) and, under ``action='abort'``, every
  rank exits once all live ranks have it.

The old protocol read every rank's heartbeat on every rank every interval: ``3 N`` requests per
rank, ``3 N**2`` at the store, which also serves NCCL's rendezvous and ``new_group``.

A peer that dies is no hang on gloo: its peers' collectives raise at once, naming no rank.
:meth:`HangWatcher.lost_peers` names the ranks whose heartbeats stopped; one rank (elected through
the store) reads them, the others take its answer.
"""
import itertools
import json
import os
import os.path as osp
import sys
import threading
import time
import traceback
from typing import Any, Dict, List, Optional

import torch
from mmengine.logging import print_log

from . import dist as ddist
from .compat import store_get
from .text import innermost_user

ACTIONS = ('report', 'abort')
ABORT_EXIT_CODE = 70
_SERIALS = itertools.count()  # watchers are made in the same order on every rank: key prefixes
BETWEEN = 'between iterations (after_train_iter hooks: checkpoint, logging; then the next batch)'
_POLL_S = 0.2


class HangWatcher:
    """One rank's side of the protocol: progress marks from the training thread, a watcher thread.

    Args: as :class:`mmddp_hooks.hooks.HangWatchdogHook`.
    """

    def __init__(self, timeout: Optional[float] = None, action: str = 'report',
                 interval: float = 1.0, min_timeout: float = 300.0, step_factor: float = 20.0,
                 first_factor: float = 3.0, report_file: str = 'hang_report.txt') -> None:
        if action not in ACTIONS:
            raise ValueError(f'HangWatchdogHook: action must be one of {ACTIONS}, got {action!r}')
        if (timeout is not None and timeout <= 0) or interval <= 0:
            raise ValueError(f'HangWatchdogHook: timeout and interval must be > 0, got '
                             f'{timeout} and {interval}')
        self.timeout, self.action, self.interval = timeout, action, interval
        self.min_timeout, self.step_factor, self.first_factor = min_timeout, step_factor, first_factor
        self.report_file = report_file
        self.report_path: Optional[str] = None
        self.reports: List[str] = []
        self.beats = 0  # heartbeats this rank posted
        self._prefix = f'mmddp_hooks/hang/{next(_SERIALS)}'
        self._state: Dict[str, Any] = dict(iter=0, phase='before training', since=time.time(),
                                           seq=0)
        self._slowest_step = 0.0
        self._stop = threading.Event()
        self._alarmed = False
        self._work_dir = '.'

    # ------------------------------------------------------------------ the training thread's side
    def mark(self, phase: str, iteration: Optional[int] = None) -> None:
        """Progress: this rank entered ``phase`` (one dict swap, no store request)."""
        state = self._state
        self._state = dict(iter=state['iter'] if iteration is None else iteration, phase=phase,
                           since=time.time(), seq=state['seq'] + 1)

    def step_took(self, seconds: float) -> None:
        self._slowest_step = max(self._slowest_step, seconds)

    def current_timeout(self) -> float:
        if self.timeout is not None:
            return self.timeout
        base = max(self.min_timeout, self.step_factor * self._slowest_step)
        return base if self._slowest_step else self.first_factor * base

    def start(self, work_dir: str) -> None:
        """Start this rank's watcher thread."""
        self._work_dir = work_dir
        self._stop = threading.Event()
        threading.Thread(target=self._watch, args=(self._stop,), name='mmddp-hang-watchdog',
                         daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    # ---------------------------------------------------------------------------- the watcher
    def _watch(self, stop: threading.Event) -> None:
        try:
            self._watch_store(stop)
        except Exception as e:  # the store went away: the run ended, or its host rank died
            if not stop.is_set():
                sys.stderr.write(f'[mmddp_hooks] HangWatchdogHook stopped watching on rank '
                                 f'{ddist.get_rank()}: {e!r}\n')
                if self.action == 'abort' and self._alarmed:
                    os._exit(ABORT_EXIT_CODE)

    def _watch_store(self, stop: threading.Event) -> None:
        rank, world, store = ddist.get_rank(), ddist.get_world_size(), ddist.store()
        peer = _Peer(store, f'{self._prefix}/beat/{(rank + 1) % world}')
        gen, quiet_until = 0, 0.0
        while not stop.wait(self.interval):
            now = time.time()
            store.set(f'{self._prefix}/beat/{rank}', json.dumps(dict(self._state, beat=now)))
            self.beats += 1
            if not store.add(f'{self._prefix}/alarm/{gen}', 0):
                if now < quiet_until or now - peer.still_since(now) < self.current_timeout():
                    continue
                store.add(f'{self._prefix}/alarm/{gen}', 1)
            self._alarmed = True
            self._post_stack(store, gen, rank)
            if store.add(f'{self._prefix}/reporter/{gen}', 1) == 1:
                self._report(store, gen, world)
            report = self._wait_report(store, gen)
            if self.action == 'abort':
                sys.stderr.write(f'[mmddp_hooks] HangWatchdogHook: rank {rank} aborts\n{report}\n')
                sys.stderr.flush()
                self._exit_together(store, gen)
            gen += 1
            quiet_until = time.time() + self.current_timeout()

    def _exit_together(self, store, gen: int) -> None:
        """Exit once every live rank has its report (a rank that exits first breaks its peers'
        collectives, which then raise instead of printing it), at most a few seconds later."""
        key = f'{self._prefix}/exiting/{gen}'
        store.add(key, 1)
        live = store.add(f'{self._prefix}/stacks/{gen}', 0)
        deadline = time.time() + max(3.0, 2 * self.interval)
        while time.time() < deadline and store.add(key, 0) < live:
            time.sleep(0.05)
        os._exit(ABORT_EXIT_CODE)

    def _post_stack(self, store, gen: int, rank: int) -> None:
        frame = sys._current_frames().get(threading.main_thread().ident)
        frames = traceback.extract_stack(frame) if frame is not None else []
        dump = getattr(torch._C._distributed_c10d, '_dump_nccl_trace', None)
        if ddist.backend_in_use() != 'nccl':
            dump = None
        trace = osp.join(self._work_dir, f'nccl_trace_rank{rank}.pkl') if dump else None
        store.set(f'{self._prefix}/stack/{gen}/{rank}', json.dumps(dict(
            self._state, frames=[(f.filename, f.lineno, f.name) for f in frames],
            nccl_trace=trace)))  # posted first: a slow dump must not make this rank look dead
        store.add(f'{self._prefix}/stacks/{gen}', 1)
        if dump:
            _dump_nccl_trace(dump, trace)

    def _report(self, store, gen: int, world: int) -> None:
        """Wait a few seconds for the live ranks' stacks, then write one report (``O(N)`` reads,
        on this rank, once per hang)."""
        now = time.time()
        beats = _read_all(store, f'{self._prefix}/beat', world)
        live = [r for r, b in beats.items() if now - b['beat'] < max(10.0, 5 * self.interval)]
        deadline = now + max(5.0, 4 * self.interval)
        while time.time() < deadline and store.add(f'{self._prefix}/stacks/{gen}', 0) < len(live):
            time.sleep(_POLL_S)
        stacks = _read_all(store, f'{self._prefix}/stack/{gen}', world)
        text = describe_hang(stacks, beats, world, self.current_timeout(), now)
        self.reports.append(text)
        print_log(text, logger='current', level=40)
        self.report_path = osp.join(self._work_dir, self.report_file)
        try:
            with open(self.report_path, 'a') as f:
                f.write(text + '\n')
        except OSError as e:
            print_log(f'[mmddp_hooks] could not write {self.report_path}: {e}', logger='current')
        store.set(f'{self._prefix}/report/{gen}', text)

    def _wait_report(self, store, gen: int) -> str:
        report = _poll(store, f'{self._prefix}/report/{gen}', max(15.0, 8 * self.interval))
        return ('(the rank that writes the report did not: see the other ranks)' if report is None
                else report.decode())

    # ---------------------------------------------------------------------------- lost peers
    def lost_peers(self) -> str:
        """The ranks whose heartbeat stays still for a while ('' when every rank still beats).

        Every rank whose collective broke asks at once: one of them (the first to count itself
        in the store) reads every heartbeat, twice, a few seconds apart, and posts what it found;
        the others read that (``O(1)`` requests each, ``O(N)`` on the one)."""
        rank, world = ddist.get_rank(), ddist.get_world_size()
        wait = max(3.0, 3 * self.interval)
        error_at = time.time()
        key = f'{self._prefix}/lost'
        try:
            store = ddist.store()
            if store.add(f'{key}/reader', 1) == 1:
                found = _stilled(store, f'{self._prefix}/beat', world, wait)
                store.set(key, json.dumps(found))
            else:
                posted = _poll(store, key, wait + max(10.0, 4 * self.interval))
                found = (json.loads(posted) if posted is not None else
                         _stilled(store, f'{self._prefix}/beat', world, wait))
        except Exception as e:  # the store went with its host
            return (f'[mmddp_hooks] HangWatchdogHook: the c10d store is unreachable ({e!r}): the '
                    'process that hosts it (rank 0, or the launcher) is gone')
        lines = []
        for r, beat in found:
            if r == rank:
                continue
            last = ('it never posted a heartbeat' if beat is None else
                    f"its last heartbeat was {error_at - beat['beat']:.1f} s before this rank's "
                    f"error, in {beat['phase']} (iteration {beat['iter']})")
            lines.append(f'  rank {r}: {last}, and none came in the {wait:g} s after it')
        if not lines:
            return ''
        return '\n'.join([f'[mmddp_hooks] HangWatchdogHook: rank {rank} lost {len(lines)} peer(s): '
                          'they exited or were killed (SIGKILL, the OOM killer: `dmesg | grep -i '
                          'kill`, a segfault); their own logs say which', *lines])


class _Peer:
    """The heartbeat of the rank this one watches: since when (this rank's clock) its progress
    count has stood still."""

    def __init__(self, store, key: str) -> None:
        self.store, self.key = store, key
        self.seq: Optional[int] = None  # None: it has posted no heartbeat yet
        self.since = time.time()

    def still_since(self, now: float) -> float:
        # a key, once posted, stays: a plain get (no check first) from then on
        beat = self.store.get(self.key) if self.seq is not None else store_get(self.store, self.key)
        seq = json.loads(beat)['seq'] if beat is not None else None
        if seq != self.seq:
            self.seq, self.since = seq, now
        return self.since


def _poll(store, key: str, seconds: float) -> Optional[bytes]:
    """``key``'s value once it is posted, or None after ``seconds`` (a check every 0.2 s: a
    blocking wait would hold the store client that the training thread shares)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = store_get(store, key)
        if value is not None:
            return value
        time.sleep(_POLL_S)
    return None


def _stilled(store, prefix: str, world: int, wait: float) -> List[tuple]:
    """(rank, its last heartbeat or None) for each rank whose heartbeat did not move in ``wait``
    seconds."""
    before = _read_all(store, prefix, world)
    time.sleep(wait)
    after = _read_all(store, prefix, world)
    return [(r, before.get(r)) for r in range(world)
            if r not in after or (r in before and after[r]['beat'] == before[r]['beat'])]


def _dump_nccl_trace(dump, path: str) -> None:
    """Under NCCL, write this rank's flight-recorder buffer (the collectives it ran, and the one it
    waits in) where the report names it: an abort ends the rank long before NCCL's own timeout
    would dump it. Empty unless TORCH_NCCL_TRACE_BUFFER_SIZE was set before the process group was
    made (``tools/train.py --hang-timeout`` sets it)."""
    try:
        with open(path, 'wb') as f:
            f.write(dump())
    except Exception as e:  # a report without the dump beats no report
        sys.stderr.write(f'[mmddp_hooks] could not write {path}: {e!r}\n')


# what gloo and NCCL raise in a rank whose peer went away
_PEER_GONE = ('Connection closed by peer', 'Connection reset by peer', 'Broken pipe',
              'Connection refused', 'NCCL communicator was aborted', 'remote process exited')


def peer_connection_broke(e: BaseException) -> bool:
    return (type(e).__name__ == 'DistBackendError'
            or any(text in str(e) for text in _PEER_GONE))


def _read_all(store, prefix: str, world: int) -> Dict[int, Dict[str, Any]]:
    found = {r: store_get(store, f'{prefix}/{r}') for r in range(world)}
    return {r: json.loads(v) for r, v in found.items() if v is not None}


def _user_frame(frames: List[list]) -> Optional[list]:
    """The innermost frame of user code (:func:`mmddp_hooks.text.is_library`)."""
    user = innermost_user([f[0] for f in frames])
    return None if user is None else frames[user]


def _waits_in(frames: List[list]) -> str:
    """What a rank is blocked in, read from the library frames below its innermost user frame
    ('' when it is in user code, or in no known wait)."""
    user = _user_frame(frames)
    below = frames[frames.index(user) + 1:] if user else frames
    inner = ' '.join(f'{f[0]}:{f[2]}' for f in below[-8:])
    if 'torch/autograd' in inner and 'backward' in inner:
        return "in backward, where DDP all-reduces the gradients"
    if 'distributed_c10d' in inner:
        name = next(f[2] for f in reversed(frames) if 'distributed_c10d' in f[0])
        return f'in a collective ({name})'
    if 'parallel/distributed.py' in inner:
        return "in DDP's forward (its buffer broadcast)"
    return ''


def _where(stack: Dict[str, Any]) -> str:
    frames = stack['frames']
    user = _user_frame(frames)
    at = f'{user[0]}:{user[1]} in {user[2]}' if user else 'no frame of user code'
    waits = _waits_in(frames)
    dataloader = not waits and any('dataloader' in f[0] or f[2] == '__getitem__' for f in frames)
    return (f"{stack['phase']} (iteration {stack['iter']}) at {at}"
            + (f', waiting {waits}' if waits else '')
            + (', in the dataloader' if dataloader else ''))


def describe_hang(stacks: Dict[int, Dict[str, Any]], beats: Dict[int, Dict[str, Any]],
                  world: int, timeout: float, now: float) -> str:
    """The report: the straggler first, then the waiting ranks grouped by where they wait, then the
    ranks that posted nothing (dead, or stuck where their watchdog thread cannot run)."""
    groups: Dict[str, List[int]] = {}
    for r, s in sorted(stacks.items()):
        groups.setdefault(_where(s), []).append(r)
    stuck = [w for w in groups if ', waiting ' not in w]
    silent = [r for r in range(world) if r not in stacks]
    lines = [f'[mmddp_hooks] HangWatchdogHook: no progress for {timeout:g} s on {world} ranks']
    lines += [f'  STRAGGLER: {_ranks(groups[w])} is in {w}' for w in stuck]
    lines += [f'  {_ranks(groups[w])}: {w}' for w in groups if w not in stuck]
    for r in silent:
        b = beats.get(r)
        last = (f"its last heartbeat was {now - b['beat']:.0f} s ago, in {b['phase']} (iteration "
                f"{b['iter']})" if b else 'it never posted a heartbeat')
        lines.append(f'  rank {r}: dead or unreachable ({last}; a rank stuck in C code that holds '
                     'the GIL looks the same)')
    if not stuck and not silent:
        lines.append('  every rank waits in a collective: they disagree on which one comes next '
                     '(a collective that only some ranks reach)')
    traces = {r: s['nccl_trace'] for r, s in sorted(stacks.items()) if s.get('nccl_trace')}
    if traces:
        lines.append("  NCCL flight recorder (torch's pickled trace of each rank's collectives): "
                     + ', '.join(f'rank {r}: {p}' for r, p in traces.items()))
    return '\n'.join(lines)


def _ranks(ranks: List[int]) -> str:
    return f'rank {ranks[0]}' if len(ranks) == 1 else 'ranks ' + ', '.join(map(str, ranks))
