"""Run this repository's tools as a user would, under a hard timeout that kills the whole launch."""
import contextlib
import io
import os
import signal
import subprocess
import sys
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
    """Exit code and output of ``cmd`` run from the repository root, in its own process group."""
    proc = start(cmd, **env)
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


def doctor(config, *args: str) -> Tuple[int, str]:
    """``tools/ddp_doctor.py CONFIG ARGS``, called in this process (its ranks are then the suite's
    warm ones): its exit code and everything it printed. tests/test_hang_watchdog.py runs it as a
    process."""
    if str(ROOT / 'tools') not in sys.path:
        sys.path.insert(0, str(ROOT / 'tools'))
    import ddp_doctor

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        path = config if '::' in str(config) else str(ROOT / config)  # a shipped one: pkg::path
        code = ddp_doctor.main([path, *map(str, args)])
    return code, out.getvalue()
