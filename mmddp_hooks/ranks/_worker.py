"""One rank of :func:`mmddp_hooks.ranks.run_on_ranks`: init, call, teardown, write the result.

``python -m mmddp_hooks.ranks._worker SPEC RANK RESULT`` runs one job and exits.
``python -m mmddp_hooks.ranks._worker --zygote`` imports torch and MMEngine once, then forks one
rank per request (:func:`reuse_ranks`): requests come on stdin, one JSON line each, and what it
forked, imported and reaped goes to stdout, one JSON line each. A forked rank is a new process that
runs one job and exits: only what the zygote imported is shared, never what an earlier job did.
"""
import faulthandler
import json
import os
import pickle
import random
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, Optional


def run_job(spec_path: str, rank: str, result_path: str,
            modules_before: Optional[Dict[str, Any]] = None) -> int:
    """``modules_before``: ``sys.modules`` when the job began; a successful job then names the
    modules it imported (``_imported``), for the zygote to import before the next fork."""
    from mmddp_hooks.ranks.launch import STACK_DUMP_AT

    if STACK_DUMP_AT in os.environ:
        faulthandler.dump_traceback_later(max(float(os.environ[STACK_DUMP_AT]) - time.time(), 0.1),
                                          file=sys.stderr)
    from mmddp_hooks.dist import init_dist_if_needed, teardown

    try:
        with open(spec_path, 'rb') as f:
            fn, args, kwargs, backend, timeout = pickle.load(f)
        assert int(os.environ['RANK']) == int(rank)
        if backend is not None:  # None: the function initialises the process group itself
            # collectives outlast the harness's deadline: a hung one is killed with its stack, not
            # ended by its own timeout in a race with the kill (a forked rank starts at once)
            init_dist_if_needed(backend, timeout_s=timeout + 30)
        payload = {'value': fn(*args, **kwargs)}
        teardown()
        code = 0
        if modules_before is not None:
            payload['_imported'] = _imported_since(modules_before)
    except BaseException:  # noqa: B036 - the harness reports whatever ended the rank
        payload = {'error': traceback.format_exc()}
        code = 1
    tmp = result_path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            pickle.dump(payload, f)
    except Exception:
        with open(tmp, 'wb') as f:
            pickle.dump({'error': 'return value is not picklable:\n' + traceback.format_exc()}, f)
        code = 1
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os.replace(tmp, result_path)
    return code


def _imported_since(before: Dict[str, Any]) -> list:
    """Modules imported since ``before``, in import order, that the zygote can import by name:
    files outside the temporary directory (MMEngine loads configs from temporary modules)."""
    tmp = os.path.realpath(tempfile.gettempdir())
    names = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, '__file__', None)
        if name in before or name.startswith('__') or not path:
            continue
        if not os.path.realpath(path).startswith(tmp + os.sep):
            names.append(name)
    return names


# ------------------------------------------------------------------------------------------ zygote
class _Lines:
    """Whole lines from a raw file descriptor (no buffering that would hide a line from select)."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf = fd, b''

    def read(self) -> Optional[list]:
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b'\n')
        return [json.loads(line) for line in lines if line.strip()]


def zygote() -> int:
    """Import once, then fork ranks, import what they imported, and report their exits."""
    import selectors

    import torch
    import torch.distributed

    import mmddp_hooks  # noqa: F401 - what every job imports

    requests, events = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)  # stray output goes to the zygote's log, never into the event stream
    lines = _Lines(requests)
    cwd = os.getcwd()
    del torch

    def emit(**event: Any) -> None:
        os.write(events, (json.dumps(event) + '\n').encode())

    selector = selectors.DefaultSelector()
    selector.register(requests, selectors.EVENT_READ)
    emit(ready=os.getpid())
    while True:
        ready = selector.select(timeout=0.05)
        while True:  # reap every rank that ended: the harness polls these codes
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            emit(exited=pid, code=os.waitstatus_to_exitcode(status))
        if not ready:
            continue
        batch = lines.read()
        if batch is None:  # the harness closed the pipe
            return 0
        for request in batch:
            if 'modules' in request:
                for name in request['modules']:
                    try:
                        __import__(name)
                    except BaseException:  # noqa: B036 - a module that cannot be imported again
                        pass
                # fork copies one thread: a lock another thread holds would never be released
                threads = len(os.listdir('/proc/self/task'))
                emit(imported=len(request['modules']), threads=threads)
                if threads > 1:
                    return 3
                continue
            pid = os.fork()
            if pid == 0:
                os.close(requests)
                os.close(events)
                selector.close()
                _be_rank(request, cwd)  # never returns
            try:
                os.setpgid(pid, request['pgid'] or pid)
            except OSError:  # the child did it first, or its group is gone (its run is over)
                pass
            emit(forked=pid)


def _be_rank(job: Dict[str, Any], cwd: str) -> None:
    """In the forked child: become the rank a fresh ``_worker`` would be, run the job, exit."""
    code = 1
    try:
        os.setpgid(0, job['pgid'] or 0)
        fd = os.open(job['log'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(job['env'])  # the whole environment a fresh rank would get
        sys.argv = [sys.argv[0], job['spec'], str(job['rank']), job['result']]
        tempfile.tempdir = None  # the job's TMPDIR (its run's folder)
        random.seed()  # a fresh interpreter's generators draw from the OS, not the zygote's state
        if 'numpy' in sys.modules:
            sys.modules['numpy'].random.seed()
        sys.modules['torch'].distributed.set_debug_level_from_env()
        code = run_job(job['spec'], str(job['rank']), job['result'], dict(sys.modules))
        import atexit

        atexit._run_exitfuncs()  # what a process's exit would run (a rank may abort there)
    except BaseException:  # noqa: B036 - anything at all: the rank must not return to the loop
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


if __name__ == '__main__':
    if sys.argv[1] == '--zygote':
        sys.exit(zygote())
    sys.exit(run_job(*sys.argv[1:4]))
