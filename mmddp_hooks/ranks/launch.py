"""Run a function on N gloo CPU ranks with a hard timeout that kills the whole process group.

Each rank is a fresh interpreter (``python -m mmddp_hooks.ranks._worker``) with torchrun's
environment variables, so code under test sees exactly what it would see under ``torchrun``. All ranks
share one process group (POSIX pgid): on timeout, or shortly after one rank fails while its peers wait in
a collective, the harness SIGKILLs the group, dataloader workers included. A hung collective therefore
fails the test with each rank's output instead of hanging the suite.

:func:`~mmddp_hooks.ranks.zygotes.reuse_ranks` keeps that isolation and drops the start-up cost:
each rank is then forked from a zygote that imported torch, MMEngine and this package once.
``fresh=True`` keeps a run in fresh interpreters (what must see a real interpreter start or exit).
"""
import itertools
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .results import DistRunResult, RankResult
from .zygotes import REUSE, learn, shared_env, zygotes_for

STACK_DUMP_LEAD = 2.0  # seconds before the timeout at which a rank still running dumps its stacks
# when (time.time()) a rank still running writes every thread's stack to its log: just before the
# harness kills it. faulthandler's own thread writes it, with no signal that would interrupt a
# blocking call and without the GIL, so a rank stuck anywhere still says where.
STACK_DUMP_AT = 'MMDDP_STACK_DUMP_AT'
_DUMP = re.compile(r'^(Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):', re.M)


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
    forked = (REUSE['on'] and not fresh and env is None and local_devices is None
              and backend == 'gloo')
    zygotes = zygotes_for(world_size) if forked else []
    base_env = shared_env(world_size)
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
                    [sys.executable, '-m', 'mmddp_hooks.ranks._worker', str(spec), str(rank),
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
        learn(learned)
    return result


def _silent_exit_hint(workdir: Path) -> str:
    """Why a rank can end with neither output nor result: it could not write either."""
    free = shutil.disk_usage(workdir).free
    return (f' and printed nothing; {free / 2**20:.0f} MiB free on the disk of {workdir.parent}'
            + (' (a full disk: the rank could write neither its log nor its result)'
               if free < 64 * 2**20 else ''))


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
