"""Run a function on N gloo CPU ranks with a hard timeout that kills the whole process group.

Each rank is a fresh interpreter (``python -m mmddp_hooks.testing._worker``) with torchrun's
environment variables, so code under test sees exactly what it would see under ``torchrun``. All ranks
share one process group (POSIX pgid): on timeout, or shortly after one rank fails while its peers wait in
a collective, the harness SIGKILLs the group, dataloader workers included. A hung collective therefore
fails the test with each rank's output instead of hanging the suite.

:func:`reuse_ranks` keeps that isolation and drops the start-up cost: each rank is then forked from
a zygote, an interpreter that imported torch, MMEngine and this package once (one zygote per rank
index, so ranks keep distinct hash seeds as fresh interpreters have). A forked rank is a new process
that runs one job and exits, with its own process group on a fresh port, log, environment and
``TMPDIR``; what it imported is imported by the zygotes after the run, so the next run's ranks start
with it (mmseg or mmdet are imported once a session, not once a run). Nothing an earlier run did
reaches a later one. ``fresh=True`` keeps a run in fresh interpreters (what must see a real
interpreter start or exit).
"""
import atexit
import itertools
import json
import os
import pickle
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

OUTPUT_TAIL_CHARS = 6000
STACK_DUMP_LEAD = 2.0  # seconds before the timeout at which a rank still running dumps its stacks
# when (time.time()) a rank still running writes every thread's stack to its log: just before the
# harness kills it. faulthandler's own thread writes it, with no signal that would interrupt a
# blocking call and without the GIL, so a rank stuck anywhere still says where.
STACK_DUMP_AT = 'MMDDP_STACK_DUMP_AT'
_DUMP = re.compile(r'^(Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):', re.M)


class DistTestFailure(AssertionError):
    """Raised by :meth:`DistRunResult.values` when any rank failed, hung or was killed."""


class DistTeardownFault(DistTestFailure):
    """Every rank did its work and wrote its result, but some rank then died while exiting."""


@dataclass
class RankResult:
    rank: int
    exitcode: Optional[int]
    value: Any = None
    error: Optional[str] = None
    output: str = ''
    has_value: bool = False  # its work returned and the result file holds the value

    @property
    def ok(self) -> bool:
        return self.exitcode == 0 and self.error is None

    @property
    def finished(self) -> bool:
        """The rank's work returned and its result was written (whatever happened at exit)."""
        return self.error is None and self.has_value

    @property
    def teardown_fault(self) -> bool:
        """Finished its work, wrote its result, then exited non-zero (e.g. SIGABRT at exit)."""
        return self.finished and self.exitcode != 0


@dataclass
class DistRunResult:
    world_size: int
    timed_out: bool
    elapsed: float
    ranks: List[RankResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(r.ok for r in self.ranks)

    @property
    def work_done(self) -> bool:
        """Every rank finished its work and wrote its result (a fault at exit may follow)."""
        return not self.timed_out and all(r.finished for r in self.ranks)

    @property
    def teardown_fault(self) -> bool:
        """The work succeeded on every rank, but some rank died while exiting."""
        return self.work_done and not self.ok

    def describe(self) -> str:
        head = (f'{self.world_size} ranks, {self.elapsed:.1f}s'
                + (', TIMED OUT (process group killed)' if self.timed_out else '')
                + (', TEARDOWN FAULT: every rank finished its work and wrote its result, then '
                   'a rank died at exit' if self.teardown_fault else ''))
        parts = [head]
        for r in self.ranks:
            status = ('ok' if r.ok else
                      f'finished its work, then died at exit (exit code {r.exitcode})'
                      if r.teardown_fault else f'FAILED (exit code {r.exitcode})')
            parts.append(f'--- rank {r.rank}: {status}')
            if r.error:
                parts.append(r.error.rstrip())
            if r.output.strip():
                parts.append('[output]\n' + r.output[-OUTPUT_TAIL_CHARS:].rstrip())
        return '\n'.join(parts)

    def values(self) -> List[Any]:
        """Each rank's return value, or :class:`DistTestFailure` with every rank's output."""
        if not self.ok:
            raise (DistTeardownFault if self.teardown_fault else DistTestFailure)(self.describe())
        return [r.value for r in self.ranks]


PORT_BLOCK = 1000  # ports each pytest-xdist worker cycles through
# from a place of this process's own: processes started together (two doctors, several people's
# test runs on one machine) would otherwise all try the block's first ports, and one's ranks can
# take a port between another's check and its bind (EADDRINUSE)
_PORTS = itertools.count(random.SystemRandom().randrange(PORT_BLOCK))


def free_port() -> int:
    """A port no process listens on, below the kernel's ephemeral range (32768 and up, where the
    ranks' own outgoing connections get theirs: none can take it between this check and the
    store's bind), in a block of its own for each pytest-xdist worker, so that two workers never
    pick the same one."""
    worker = os.environ.get('PYTEST_XDIST_WORKER', 'gw0')
    base = 20000 + PORT_BLOCK * (int(worker[2:] or 0) % 12)
    for _ in range(PORT_BLOCK):
        port = base + next(_PORTS) % PORT_BLOCK
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(('127.0.0.1', port))
            except OSError:  # in use, or still in TIME_WAIT from an earlier run
                continue
            return port
    raise RuntimeError(f'free_port: no free port in {base}..{base + PORT_BLOCK - 1}')


def _stacks_in(output: str) -> str:
    """The faulthandler dump at the end of a rank's output."""
    match = _DUMP.search(output)
    return output[match.start():].rstrip() if match else ''


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_result(path: Path) -> Dict[str, Any]:
    if not path.exists():
        return {}
    try:
        with path.open('rb') as f:
            return pickle.load(f)
    except Exception as e:  # a half-written file from a killed rank
        return {'error': f'could not read the rank result: {e!r}'}


def run_on_ranks(fn: Callable[..., Any],
                 world_size: int = 2,
                 *,
                 args: Sequence[Any] = (),
                 kwargs: Optional[Dict[str, Any]] = None,
                 timeout: float = 120.0,
                 backend: str = 'gloo',
                 env: Optional[Dict[str, str]] = None,
                 failure_grace: float = 5.0,
                 init_process_group: bool = True,
                 local_devices: Optional[int] = None,
                 fresh: bool = False) -> DistRunResult:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks with an initialised process group.

    ``fn`` must be importable by reference (a module-level function). Each rank's return value must
    be picklable. The process group is torn down (barrier + destroy) after ``fn`` returns.

    Args:
        timeout: wall-clock seconds for the whole run; past it every rank is killed.
        failure_grace: seconds the other ranks get to finish after one rank failed, before the group
            is killed (a peer of a failed rank usually waits in a collective forever).
        init_process_group: False leaves initialisation to ``fn`` (torchrun's variables are set),
            to test code that must run before the process group exists.
        env: extra environment variables for every rank.
        local_devices: GPUs the ranks share: ``LOCAL_RANK`` is ``rank % local_devices`` (two ranks
            on one GPU both get 0; MMEngine's logger indexes the visible devices by ``LOCAL_RANK``).
            ``None``: ``LOCAL_RANK`` is the rank, as torchrun sets it on one node.
        fresh: run in fresh processes even after :func:`reuse_ranks`. Runs with ``env``,
            ``local_devices`` or a backend other than gloo always do.
    """
    kwargs = kwargs or {}
    workdir = Path(tempfile.mkdtemp(prefix='mmddp_ranks_'))
    spec = workdir / 'spec.pkl'
    with spec.open('wb') as f:
        pickle.dump((fn, tuple(args), kwargs, backend if init_process_group else None, timeout),
                    f)
    forked = (_REUSE['on'] and not fresh and env is None and local_devices is None
              and backend == 'gloo')
    zygotes = _zygotes(world_size) if forked else []
    base_env = _rank_env(world_size)
    (workdir / 'tmp').mkdir()
    # the ranks' temporary files live in the run's folder and go with it: checkpoints of work_dirs
    # made by tempfile.mkdtemp() would otherwise stay behind after every run (GBs a suite)
    per_run = {'MASTER_PORT': str(free_port()), 'TMPDIR': str(workdir / 'tmp'),
               STACK_DUMP_AT: str(time.time() + timeout - min(STACK_DUMP_LEAD, timeout / 4))}
    results = [workdir / f'rank{r}.result' for r in range(world_size)]
    logs = [workdir / f'rank{r}.log' for r in range(world_size)]
    start = time.monotonic()
    procs: List[Any] = []
    files = []
    pgid = 0
    base_env.update(per_run, **(env or {}))
    try:
        for rank in range(world_size):
            local_rank = rank % local_devices if local_devices else rank
            rank_env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(local_rank))
            if forked:
                procs.append(zygotes[rank].fork(dict(
                    rank=rank, spec=str(spec), result=str(results[rank]), log=str(logs[rank]),
                    env=rank_env, pgid=pgid)))
            else:
                log = logs[rank].open('wb')
                files.append(log)
                group = pgid
                procs.append(subprocess.Popen(
                    [sys.executable, '-m', 'mmddp_hooks.testing._worker', str(spec), str(rank),
                     str(results[rank])],
                    env=rank_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    preexec_fn=lambda g=group: os.setpgid(0, g)))
            if rank == 0:
                pgid = procs[0].pid
        timed_out = _wait(procs, start + timeout, failure_grace, results)
    finally:
        if pgid:
            _kill_group(pgid)
        for p in procs:
            p.wait()
        for log in files:
            log.close()
    elapsed = time.monotonic() - start
    result = DistRunResult(world_size=world_size, timed_out=timed_out, elapsed=elapsed)
    learned: List[str] = []
    for rank, proc in enumerate(procs):
        payload = _read_result(results[rank])
        output = logs[rank].read_text(errors='replace') if logs[rank].exists() else ''
        error = payload.get('error')
        code = proc.returncode
        learned.extend(m for m in payload.pop('_imported', ()) if m not in learned)
        if 'value' not in payload and error is None:
            error = ('rank produced no result: killed after a timeout or a peer failure'
                     if code and code < 0 else 'rank produced no result')
            stacks = _stacks_in(output) if timed_out else ''
            if stacks:
                error += '; where it was when killed (every thread, most recent call first):\n' + \
                    stacks
            elif not output:
                error += _silent_exit_hint(workdir)
        result.ranks.append(RankResult(rank=rank, exitcode=code, value=payload.get('value'),
                                       error=error, output=output, has_value='value' in payload))
    shutil.rmtree(workdir, ignore_errors=True)
    if forked and result.ok:
        _learn(learned)
    return result


def _silent_exit_hint(workdir: Path) -> str:
    """Why a rank can end with neither output nor result: it could not write either."""
    free = shutil.disk_usage(workdir).free
    return (f' and printed nothing; {free / 2**20:.0f} MiB free on the disk of {workdir.parent}'
            + (' (a full disk: the rank could write neither its log nor its result)'
               if free < 64 * 2**20 else ''))


def _rank_env(world_size: int) -> Dict[str, str]:
    """What every rank's environment has, apart from its rank and the run's port (and pytest's
    name of the running test, which would otherwise make every test start new zygotes)."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTEST_CURRENT_TEST'}
    env.update({
        'WORLD_SIZE': str(world_size),
        'LOCAL_WORLD_SIZE': str(world_size),
        'MASTER_ADDR': '127.0.0.1',
        'PYTHONPATH': os.pathsep.join(p for p in sys.path if p),
        'PYTHONUNBUFFERED': '1',
        'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1'),
    })
    return env


# ------------------------------------------------------------------------------------------ zygotes
_REUSE = {'on': False}


def reuse_ranks(enabled: bool = True) -> None:
    """Fork the ranks of later :func:`run_on_ranks` runs from zygotes (see the module docstring);
    ``False`` goes back to fresh interpreters and ends the zygotes."""
    _REUSE['on'] = enabled
    if not enabled:
        close_pools()


class _ForkedRank:
    """A rank the zygote forked: what :class:`subprocess.Popen` offers the harness (its exit code
    comes from the zygote, its parent)."""

    def __init__(self, zygote: '_Zygote', pid: int) -> None:
        self.zygote, self.pid = zygote, pid

    @property
    def returncode(self) -> Optional[int]:
        return self.poll()

    def poll(self) -> Optional[int]:
        code = self.zygote.codes.get(self.pid)
        if code is None and self.zygote.dead:  # orphaned: killed with its process group
            return -signal.SIGKILL
        return code

    def wait(self) -> int:
        with self.zygote.changed:
            self.zygote.changed.wait_for(lambda: self.poll() is not None)
        return self.poll()


class _Zygote:
    """``_worker --zygote`` for one rank index: it forks that rank of every run."""

    REPLY_TIMEOUT = 300.0  # its imports, on a loaded machine

    def __init__(self, env: Dict[str, str], modules: Sequence[str]) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix='mmddp_zygote_'))
        self.env = env
        self.codes: Dict[int, int] = {}
        self.dead = False
        self.changed = threading.Condition()
        self.replies: queue.Queue[Dict[str, Any]] = queue.Queue()
        self.pending = ['ready']  # replies still to come, in order
        with (self.workdir / 'zygote.log').open('wb') as log:
            self.proc = subprocess.Popen(
                [sys.executable, '-m', 'mmddp_hooks.testing._worker', '--zygote'], env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        threading.Thread(target=self._read, daemon=True).start()
        if modules:
            self.learn(modules)

    def _read(self) -> None:
        for line in self.proc.stdout:
            event = json.loads(line)
            if 'exited' in event:
                with self.changed:
                    self.codes[event['exited']] = event['code']
                    self.changed.notify_all()
            else:
                self.replies.put(event)
        with self.changed:
            self.dead = True
            self.changed.notify_all()
        self.replies.put({})

    def _send(self, request: Dict[str, Any]) -> None:
        try:
            os.write(self.proc.stdin.fileno(), (json.dumps(request) + '\n').encode())
        except BrokenPipeError:  # it died: its reply says so
            pass

    def settle(self) -> Optional[int]:
        """Wait for the replies still to come: its start, the imports it was sent, a fork (whose
        pid it returns)."""
        forked = None
        while self.pending:
            what = self.pending.pop(0)
            try:
                reply = self.replies.get(timeout=self.REPLY_TIMEOUT)
            except queue.Empty:
                reply = {}
            if what not in reply:
                log = (self.workdir / 'zygote.log').read_text(errors='replace')
                self.close()
                raise RuntimeError(f'a zygote of the test harness (the rank processes are forked '
                                   f'from it) sent {reply or "nothing"} instead of {what!r}:\n'
                                   + log[-OUTPUT_TAIL_CHARS:])
            if reply.get('threads', 1) > 1:
                self.close()
                raise RuntimeError(f'a zygote has {reply["threads"]} threads after importing what '
                                   'the runs imported: a fork copies only one of them, so it stopped;'
                                   ' run with reuse_ranks(False)')
            if what == 'forked':
                forked = reply['forked']
        return forked

    def fork(self, job: Dict[str, Any]) -> _ForkedRank:
        self.settle()
        self._send(job)
        self.pending.append('forked')
        return _ForkedRank(self, self.settle())

    def learn(self, modules: Sequence[str]) -> None:
        """Import ``modules`` before the next fork (the zygote stays single-threaded, or stops)."""
        self._send({'modules': list(modules)})
        self.pending.append('imported')

    def close(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdin.close()
        except OSError:
            pass
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
            for key, zygote in list(_ZYGOTES.items()):
                if zygote is self:
                    del _ZYGOTES[key]


_ZYGOTES: Dict[int, _Zygote] = {}  # one per rank index
_LEARNED: List[str] = []  # what the runs imported, in order: every zygote imports it


def _zygotes(world_size: int) -> List[_Zygote]:
    """The zygotes of ranks ``0 .. world_size - 1``, done with their imports. They start with the
    environment the ranks get now (new ones if it changed, so what a module reads at import time is
    what a fresh rank would read), together, so that they import at the same time."""
    env = _rank_env(0)
    for key in ('WORLD_SIZE', 'LOCAL_WORLD_SIZE'):
        env.pop(key)
    if any(z.env != env or z.dead for z in _ZYGOTES.values()):
        close_pools()
    for rank in range(world_size):
        if rank not in _ZYGOTES:
            _ZYGOTES[rank] = _Zygote(env, _LEARNED)
    zygotes = [_ZYGOTES[rank] for rank in range(world_size)]
    for zygote in zygotes:
        zygote.settle()
    return zygotes


def _learn(modules: Sequence[str]) -> None:
    new = [m for m in modules if m not in _LEARNED]
    if new:
        _LEARNED.extend(new)
        for zygote in list(_ZYGOTES.values()):  # they import at the same time
            zygote.learn(new)


@atexit.register
def close_pools() -> None:
    """End every zygote (the ranks it forked end with their runs)."""
    for zygote in list(_ZYGOTES.values()):
        zygote.close()


def _wait(procs: List[Any], deadline: float, failure_grace: float, results: List[Path]) -> bool:
    """Poll until every rank exits; True if the deadline passed first.

    A rank that exited non-zero (or wrote an error) starts the grace period for its peers, unless
    it had finished its work (its result holds a value): dying at exit leaves no peer waiting, so
    they run on.
    """
    first_failure: Optional[float] = None
    payloads: List[Dict[str, Any]] = [{} for _ in results]
    while True:
        codes = [p.poll() for p in procs]
        payloads = [p or _read_result(path) for p, path in zip(payloads, results)]  # once each
        if all(c is not None for c in codes):
            return False
        now = time.monotonic()
        if now >= deadline:
            return True
        if first_failure is None and any(
                'value' not in r and (c not in (None, 0) or 'error' in r)
                for c, r in zip(codes, payloads)):
            first_failure = now
        if first_failure is not None and now - first_failure >= failure_grace:
            return False  # peers of a failed rank: killed by the caller's finally
        time.sleep(0.02)


def run_distributed(fn: Callable[..., Any], world_size: int = 2, **kw: Any) -> List[Any]:
    """:func:`run_on_ranks` then :meth:`DistRunResult.values`: the rank values, or a test failure."""
    return run_on_ranks(fn, world_size, **kw).values()
