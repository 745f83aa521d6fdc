"""Run this repository's tools as a user would, under a hard timeout that kills the whole launch."""
import contextlib
import io
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Tuple

import pytest

ROOT = Path(__file__).parents[1]


def start(cmd: List[str], **env: str) -> subprocess.Popen:
    """``cmd`` started from the repository root in its own process group, with ``env`` added."""
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED='1', **env)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run(cmd: List[str], timeout: float = 300, **env: str) -> Tuple[int, str]:
    """Exit code and output of ``cmd`` run from the repository root, in its own process group, with
    a ``TMPDIR`` removed afterwards (torchrun leaves a ``torchelastic_*`` folder there)."""
    with tempfile.TemporaryDirectory(prefix='mmddp-launch-') as tmp:
        proc = start(cmd, **{'TMPDIR': tmp, **env})
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f'timed out after {timeout}s:\n{out[-5000:]}')
    return proc.returncode, out


def dist_train(config, work_dir, *args: str, nproc: int = 2) -> Tuple[int, str]:
    """``tools/dist_train.sh CONFIG NPROC --work-dir DIR ARGS``."""
    return run(['bash', 'tools/dist_train.sh', str(config), str(nproc), '--work-dir', str(work_dir),
                *map(str, args)])


def train(config, work_dir, *args: str, nproc: int = 2, launcher: str = 'pytorch',
          timeout: float = 300) -> Tuple[int, str]:
    """What ``tools/dist_train.sh CONFIG NPROC --work-dir DIR ARGS`` does, without its three
    interpreter starts: ``tools/train.py``'s ``main`` on ``nproc`` of the suite's forked ranks, with
    torchrun's variables. Its exit code (a rank's non-zero one, 1 for a rank that raised) and every
    rank's output and error, rank 0 first. tests/test_launchers.py runs the launchers themselves."""
    from mmddp_hooks.ranks import run_on_ranks

    argv = [str(config), '--launcher', launcher, '--work-dir', str(work_dir), *map(str, args)]
    result = run_on_ranks(train_main, nproc, args=(argv,), init_process_group=False,
                          timeout=timeout)
    codes = [r.value if r.ok else (r.exitcode or 1) for r in result.ranks]
    out = '\n'.join(r.output + (r.error or '') for r in result.ranks)
    return next((c for c in codes if c), 0), out + ('\nTIMED OUT' if result.timed_out else '')


def train_main(argv: List[str]) -> int:
    """On a rank: ``tools/train.py``'s ``main(argv)``."""
    import train

    return train.main(argv)


def doctor(config, *args: str) -> Tuple[int, str]:
    """``tools/ddp_doctor.py CONFIG ARGS``, called in this process (its ranks are then forked from
    the suite's zygotes): its exit code and everything it printed. tests/test_hang_watchdog.py runs
    it as a process."""
    import ddp_doctor

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        path = config if '::' in str(config) else str(ROOT / config)  # a shipped one: pkg::path
        code = ddp_doctor.main([path, *map(str, args)])
    return code, out.getvalue()
