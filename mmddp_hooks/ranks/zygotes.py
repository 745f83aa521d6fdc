""":func:`reuse_ranks`: each rank forked from a zygote, an interpreter that imported torch, MMEngine and
this package once (one zygote per rank index, so ranks keep distinct hash seeds as fresh interpreters
have). A forked rank is a new process that runs one job and exits, with its own process group on a
fresh port, log, environment and ``TMPDIR``; what it imported is imported by the zygotes after the
run, so the next run's ranks start with it (mmseg or mmdet are imported once a session, not once a
run). Nothing an earlier run did reaches a later one.
"""
import atexit
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .results import OUTPUT_TAIL_CHARS


def shared_env(world_size: int) -> Dict[str, str]:
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
REUSE = {'on': False}


def reuse_ranks(enabled: bool = True) -> None:
    """Fork the ranks of later :func:`run_on_ranks` runs from zygotes (see the module docstring);
    ``False`` goes back to fresh interpreters and ends the zygotes."""
    REUSE['on'] = enabled
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
                [sys.executable, '-m', 'mmddp_hooks.ranks._worker', '--zygote'], env=env,
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


def zygotes_for(world_size: int) -> List[_Zygote]:
    """The zygotes of ranks ``0 .. world_size - 1``, done with their imports. They start with the
    environment the ranks get now (new ones if it changed, so what a module reads at import time is
    what a fresh rank would read), together, so that they import at the same time."""
    env = shared_env(0)
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


def learn(modules: Sequence[str]) -> None:
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

