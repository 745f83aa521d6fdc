"""One rank of :func:`mmddp_hooks.testing.run_on_ranks`: init, call, teardown, write the result.

``python -m mmddp_hooks.testing._worker SPEC RANK RESULT`` runs one job and exits.
``python -m mmddp_hooks.testing._worker --serve RANK`` is a warm rank (:func:`reuse_ranks`): it reads
jobs from stdin, one JSON line each, and runs them one after the other, each with its own log, its
own process group (a fresh port), the working directory, environment, torch seed and Python
warning filters the rank started with (a warning shown once is shown again), and /dev/null as
stdin; it exits after a job that failed, so a failed job's state is never reused. What it cannot
undo is what a successful job leaves behind: a module it patched (cases restore theirs), threads or
processes it started, or a warning C++ gives once per process (such a case asks for a fresh run).
"""
import faulthandler
import json
import os
import pickle
import sys
import tempfile
import time
import traceback
import warnings


def run_job(spec_path: str, rank: str, result_path: str) -> int:
    from mmddp_hooks.testing.harness import STACK_DUMP_AT

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
            # ended by its own timeout in a race with the kill (a warm rank starts at once)
            init_dist_if_needed(backend, timeout_s=timeout + 30)
        payload = {'value': fn(*args, **kwargs)}
        teardown()
        code = 0
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


def serve(rank: str) -> int:
    """Run the jobs the harness writes to stdin until it closes it (or a job fails)."""
    import torch
    import torch.distributed

    import mmddp_hooks  # noqa: F401 - what every job imports: paid once per warm rank

    base_env, seed, filters = dict(os.environ), torch.initial_seed(), list(warnings.filters)
    cwd = os.getcwd()
    jobs = os.fdopen(os.dup(0), 'r')  # the harness's pipe; a job's stdin is /dev/null, as fresh
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    while True:
        line = jobs.readline()
        if not line:
            return 0
        job = json.loads(line)
        os.chdir(cwd)
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(job['log'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.environ.clear()
        os.environ.update(base_env, **job['env'])
        tempfile.tempdir = None  # the job's TMPDIR (its run's folder), not the last job's
        torch.distributed.set_debug_level_from_env()  # a job may have set DDP's debug level
        torch.manual_seed(seed)
        warnings.filters[:] = filters
        warnings.onceregistry.clear()
        if hasattr(warnings, '_filters_mutated'):  # forget which warnings were shown once
            warnings._filters_mutated()
        code = run_job(job['spec'], rank, job['result'])
        if code:
            return code
        _forget_mmengine_instances()


def _forget_mmengine_instances() -> None:
    """Drop MMEngine's named singletons (loggers, visualizers, message hubs, default scopes): a
    config's fixed ``visualizer`` name would otherwise hand the next run the last run's visualizer,
    writing to its (deleted) work_dir."""
    from mmengine.logging import MMLogger
    from mmengine.utils import ManagerMixin

    for logger in MMLogger._instance_dict.values():
        for handler in list(logger.handlers):
            handler.close()
            logger.removeHandler(handler)
    classes = [ManagerMixin]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if '_instance_dict' in vars(cls):
            cls._instance_dict.clear()


if __name__ == '__main__':
    if sys.argv[1] == '--serve':
        sys.exit(serve(sys.argv[2]))
    sys.exit(run_job(*sys.argv[1:4]))
