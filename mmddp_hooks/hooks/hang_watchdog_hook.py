"""HangWatchdogHook: when a rank stops making progress, say which rank, where, and what the others
wait in, within seconds, instead of a silent stall until the collective timeout."""
import itertools
import json
import os
import os.path as osp
import sys
import sysconfig
import threading
import time
import traceback
from typing import Any, Dict, List, Optional

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS
from mmengine.runner import BaseLoop

from .. import dist as ddist
from ..compat import store_get

ACTIONS = ('report', 'abort')
ABORT_EXIT_CODE = 70
_SERIALS = itertools.count()  # hooks are built in the same order on every rank: store key prefixes
# code that is not the user's: Python's, the installed packages' and this package's
_LIBRARY_DIRS = tuple({sysconfig.get_paths()['stdlib'], sysconfig.get_paths()['purelib'],
                       sysconfig.get_paths()['platlib'], osp.dirname(osp.dirname(__file__))})
BETWEEN = 'between iterations (after_train_iter hooks: checkpoint, logging; then the next batch)'


class PeerLost(RuntimeError):
    """This rank's training failed because peers are gone; the message names them."""


@HOOKS.register_module()
class HangWatchdogHook(Hook):
    """Watch every rank's progress through the c10d store; report (or abort) when one stalls.

    A thread on each rank posts, once per ``interval``, a heartbeat with its iteration and phase
    (train_step, val, checkpoint, between iterations) to the process group's store, a channel
    beside the collectives that may be hung. When some rank has made no progress for the timeout,
    every live rank posts its main thread's Python stack, and one rank writes a single report to
    the log and ``work_dir/hang_report.txt``: ranks grouped by where they are (the innermost frame
    of user code, and what they wait in), the straggler named, and ranks whose heartbeat stopped
    named as dead or unreachable.

    Args:
        timeout: seconds without progress that make a hang. ``None``: ``max(min_timeout,
            step_factor x the slowest training step so far)``, and ``first_factor`` times that
            until a step has finished, so a slow first iteration, a val loop or a checkpoint save
            is not called a hang.
        action: 'report' logs and keeps waiting (and reports again if the stall lasts another
            timeout); 'abort' ends every rank with the report on stderr and exit code 70, so the
            launcher exits promptly.
        interval: seconds between heartbeats.
    """

    priority = 'HIGHEST'

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
        self._state: Dict[str, Any] = dict(iter=0, phase='before training', since=time.time())
        self._slowest_step = 0.0
        self._step_start = 0.0
        self._stop = threading.Event()
        self._alarmed = False
        self._work_dir = '.'

    # ---------------------------------------------------------------------------- progress
    def _mark(self, phase: str, iteration: Optional[int] = None) -> None:
        self._state = dict(iter=self._state['iter'] if iteration is None else iteration,
                           phase=phase, since=time.time())

    def before_run(self, runner) -> None:
        if not ddist.is_dist():
            return
        self.start(runner.work_dir)
        if isinstance(runner._train_loop, BaseLoop):  # built by runner.train(), not by val/test
            self._name_lost_peers(runner._train_loop)

    def start(self, work_dir: str) -> None:
        """Start this rank's watcher thread (``before_run`` does; the benchmark, without a Runner)."""
        self._work_dir = work_dir
        self._stop = threading.Event()
        threading.Thread(target=self._watch, args=(self._stop,), name='mmddp-hang-watchdog',
                         daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _name_lost_peers(self, loop) -> None:
        """A peer that dies (SIGKILL, the OOM killer, a segfault) is no hang on gloo: the others'
        collectives raise at once ("Connection closed by peer"), naming no rank. MMEngine has no
        hook for an exception, so the loop's ``run`` is wrapped: on an error that says a peer's
        connection broke, the ranks whose heartbeats stopped are named, with where they last were,
        and the error is the cause."""
        run = loop.run

        def run_naming_lost_peers():
            try:
                return run()
            except Exception as e:
                lost = self.lost_peers() if _peer_connection_broke(e) else ''
                if lost:
                    raise PeerLost(f'{lost}\nThis rank\'s error, a consequence: {e!r}') from e
                raise
        loop.run = run_naming_lost_peers

    def lost_peers(self) -> str:
        """The ranks whose heartbeat stays still for a while ('' when every rank still beats)."""
        rank, world = ddist.get_rank(), ddist.get_world_size()
        wait = max(3.0, 3 * self.interval)
        error_at = time.time()
        try:
            store = ddist.store()
            before = _read_all(store, f'{self._prefix}/beat', world)
            time.sleep(wait)
            after = _read_all(store, f'{self._prefix}/beat', world)
        except Exception as e:  # the store went with its host
            return (f'[mmddp_hooks] HangWatchdogHook: the c10d store is unreachable ({e!r}): the '
                    'process that hosts it (rank 0, or the launcher) is gone')
        lines = []
        for r in range(world):
            b = before.get(r)
            if r == rank or (r in after and (b is None or after[r]['beat'] != b['beat'])):
                continue
            last = ('it never posted a heartbeat' if b is None else
                    f"its last heartbeat was {error_at - b['beat']:.1f} s before this rank's "
                    f"error, in {b['phase']} (iteration {b['iter']})")
            lines.append(f'  rank {r}: {last}, and none came in the {wait:g} s after it')
        if not lines:
            return ''
        return '\n'.join([f'[mmddp_hooks] HangWatchdogHook: rank {rank} lost {len(lines)} peer(s): '
                           'they exited or were killed (SIGKILL, the OOM killer: `dmesg | grep -i '
                           'kill`, a segfault); their own logs say which', *lines])

    def after_run(self, runner) -> None:
        self.stop()

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._step_start = time.time()
        self._mark('train_step', runner.iter + 1)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._slowest_step = max(self._slowest_step, time.time() - self._step_start)
        self._mark(BETWEEN)

    def before_val(self, runner) -> None:
        self._mark('val')

    def after_val_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._mark('val')

    def after_val(self, runner) -> None:
        self._mark(BETWEEN)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        self._mark('checkpoint')

    def current_timeout(self) -> float:
        if self.timeout is not None:
            return self.timeout
        base = max(self.min_timeout, self.step_factor * self._slowest_step)
        return base if self._slowest_step else self.first_factor * base

    # ----------------------------------------------------------------------------- watcher
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
        gen, quiet_until = 0, 0.0
        while not stop.wait(self.interval):
            now = time.time()
            store.set(f'{self._prefix}/beat/{rank}', json.dumps(dict(self._state, beat=now)))
            self.beats += 1
            alarm = f'{self._prefix}/alarm/{gen}'
            if store_get(store, alarm) is None:
                if now < quiet_until:
                    continue
                beats = _read_all(store, f'{self._prefix}/beat', world)
                if now - min(b['since'] for b in beats.values()) < self.current_timeout():
                    continue
                store.set(alarm, str(rank))
            self._alarmed = True
            self._post_stack(store, gen, rank)
            if store.add(f'{self._prefix}/reporter/{gen}', 1) == 1:
                self._report(store, gen, world)
            report = self._wait_report(store, gen)
            if self.action == 'abort':
                sys.stderr.write(f'[mmddp_hooks] HangWatchdogHook: rank {rank} aborts\n{report}\n')
                sys.stderr.flush()
                self._exit_together(store, gen, world)
            gen += 1
            quiet_until = time.time() + self.current_timeout()

    def _exit_together(self, store, gen: int, world: int) -> None:
        """Exit once every live rank has its report (a rank that exits first breaks its peers'
        collectives, which then raise instead of printing it), at most a few seconds later."""
        key = f'{self._prefix}/exiting/{gen}'
        store.add(key, 1)
        live = len(_read_all(store, f'{self._prefix}/stack/{gen}', world))
        deadline = time.time() + max(3.0, 2 * self.interval)
        while time.time() < deadline and int(store.add(key, 0)) < live:
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
        if dump:
            self._dump_nccl_trace(dump, trace)

    @staticmethod
    def _dump_nccl_trace(dump, path: str) -> None:
        """Under NCCL, write this rank's flight-recorder buffer (the collectives it ran, and the
        one it waits in) where the report names it: an abort ends the rank long before NCCL's
        own timeout would dump it. Empty unless TORCH_NCCL_TRACE_BUFFER_SIZE was set before the
        process group was made (``tools/train.py --hang-timeout`` sets it)."""
        try:
            with open(path, 'wb') as f:
                f.write(dump())
        except Exception as e:  # a report without the dump beats no report
            sys.stderr.write(f'[mmddp_hooks] could not write {path}: {e!r}\n')

    def _report(self, store, gen: int, world: int) -> None:
        """Wait a few seconds for the live ranks' stacks, then write one report."""
        now = time.time()
        beats = _read_all(store, f'{self._prefix}/beat', world)
        live = [r for r, b in beats.items() if now - b['beat'] < max(10.0, 5 * self.interval)]
        deadline = now + max(5.0, 4 * self.interval)
        stacks = _read_all(store, f'{self._prefix}/stack/{gen}', world)
        while time.time() < deadline and not set(live) <= set(stacks):
            time.sleep(0.2)
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
        key = f'{self._prefix}/report/{gen}'
        deadline = time.time() + max(15.0, 8 * self.interval)
        while time.time() < deadline:
            report = store_get(store, key)
            if report is not None:
                return report.decode()
            time.sleep(0.2)
        return '(the rank that writes the report did not: see the other ranks)'


# what gloo and NCCL raise in a rank whose peer went away
_PEER_GONE = ('Connection closed by peer', 'Connection reset by peer', 'Broken pipe',
              'Connection refused', 'NCCL communicator was aborted', 'remote process exited')


def _peer_connection_broke(e: BaseException) -> bool:
    return (type(e).__name__ == 'DistBackendError'
            or any(text in str(e) for text in _PEER_GONE))


def _read_all(store, prefix: str, world: int) -> Dict[int, Dict[str, Any]]:
    found = {r: store_get(store, f'{prefix}/{r}') for r in range(world)}
    return {r: json.loads(v) for r, v in found.items() if v is not None}


def _user_frame(frames: List[list]) -> Optional[list]:
    """The innermost frame of user code (not Python's, an installed package's or this package's)."""
    return next((f for f in reversed(frames)
                 if not f[0].startswith(_LIBRARY_DIRS) and not f[0].startswith('<')
                 and '-packages/' not in f[0]), None)


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
