"""Every ``python3 tools/...`` and ``bash tools/...`` command of the README, from a fresh shell
whose ``python3`` has no torch: the Python that made ``.venv`` (pyenv's, or a distribution's: the
very file ``.venv/bin/python`` links to), first on PATH, no venv active. A command is run as
written, or, where it takes long, needs a GPU, a cluster or a file the README made, by the cheapest
invocation that starts the same tool the same way (``--help``, or a few iterations): what a fresh
machine breaks is the start. A README command this file does not list fails the first test."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
AS_WRITTEN = None
CONFIG = 'configs/mmseg/fcn_r18_stage4-unused.py'
# the README's commands; None: run as written, else how it is run instead
# (how: each distinct invocation runs once)
HOW = {
    f'python3 tools/ddp_doctor.py {CONFIG} --size 64 64 --cfg-options custom_hooks=[]': AS_WRITTEN,
    'python3 tools/check_config.py CONFIG [--cfg-options ...] [--build] [--json]':
        f'python3 tools/check_config.py {CONFIG}',
    'bash tools/dist_train.sh configs/mmseg/fcn_r18_unfreeze-schedule.py 2 --synthetic 64 64 '
    '--iters 10': f'bash tools/dist_train.sh {CONFIG} 1 --help',
    'python3 tools/explain_ddp_error.py CONFIG train.log [--cfg-options k=v ...] [--ignore NAME ...] '
    '[--report work_dir/ddp_usage_report.json] [--json]': 'python3 tools/explain_ddp_error.py --help',
    'PYTHONPATH=tests python3 tools/ddp_doctor.py tests/configs/hang_net.py --real-data --iters 8 '
    '--hang-timeout 4': 'PYTHONPATH=tests python3 tools/ddp_doctor.py --help',
    'bash tools/dist_train.sh CONFIG NPROC [--work-dir DIR] [--resume] [--cfg-options k=v ...]':
        f'bash tools/dist_train.sh {CONFIG} 1 --help',
    f'bash tools/dist_train.sh {CONFIG} 2 --synthetic 64 64 --iters 6':
        f'bash tools/dist_train.sh {CONFIG} 1 --help',
    'GPUS=16 GPUS_PER_NODE=8 CPUS_PER_TASK=5 [SRUN_ARGS=...] [PORT=29500] bash tools/slurm_train.sh '
    'PARTITION JOB_NAME CONFIG [WORK_DIR] [train.py args]':
        'PATH=tests/fake_slurm:$PATH GPUS=1 GPUS_PER_NODE=1 GRES= bash tools/slurm_train.sh debug '
        f'fcn-r18 {CONFIG} /tmp/slurm_demo --help',
    'NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 PORT=29500 bash tools/dist_train.sh CONFIG 8 '
    '[train.py args]': f'bash tools/dist_train.sh {CONFIG} 1 --help',  # one node: the others are not here
    f'python3 tools/train.py {CONFIG} --synthetic 64 64 --iters 1 --cfg-options '
    'load_from=/tmp/evil.pth': 'python3 tools/train.py --help',  # the README made /tmp/evil.pth
    'bash tools/setup_env.sh': 'installs packages into .venv: make setup itself',
    'bash tools/run_tests.sh': 'MMDDP_TEST_WORKERS=0 bash tools/run_tests.sh --version',
    'bash tools/stress_dist.sh N [pytest args]': 'bash tools/stress_dist.sh 1 --version',
    'python3 tools/benchmark_ddp.py --quick': 'python3 tools/benchmark_ddp.py --help',
}
NOT_RUN = {'bash tools/setup_env.sh'}  # it installs into .venv; its own first run is make setup
_COMMAND = re.compile(r'(?:\[?[A-Z_]+=\S*\]? )*(?:python3|bash) tools/[\w/]+\.(?:py|sh)\b[^`\n]*')


def readme_commands():
    """The README's tool commands: in code blocks (continued lines joined, comments cut) and in
    inline code."""
    text = re.sub(r'\\\n\s*', '', (ROOT / 'README.md').read_text())
    found = []
    for command in _COMMAND.findall(text):
        command = re.split(r'\s+#', command)[0].strip()
        if command not in found:
            found.append(command)
    return found


def test_every_readme_command_is_run_here():
    assert readme_commands() == list(HOW)


@pytest.fixture(scope='module')
def bare_shell(tmp_path_factory):
    """PATH with the Python that made .venv first, as ``python3``; no venv active."""
    bare = os.path.join(os.path.realpath(sys.base_prefix), 'bin', 'python3')
    folder = tmp_path_factory.mktemp('bare_python')
    (folder / 'python3').symlink_to(bare)
    env = {k: v for k, v in os.environ.items() if k not in ('VIRTUAL_ENV', 'PYTHONHOME')}
    env['PATH'] = f"{folder}{os.pathsep}{env.get('PATH', '')}"
    has_torch = subprocess.run(['python3', '-c', 'import torch'], env=env, capture_output=True)
    assert has_torch.returncode != 0, f'{bare} has torch: no bare Python to start from here'
    return env


def _run(command: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(['bash', '-c', command], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize('command', sorted({HOW[c] for c in HOW if HOW[c] is not AS_WRITTEN
                                             and c not in NOT_RUN}))
def test_the_tool_starts_from_a_bare_python(command, bare_shell):
    done = _run(command, bare_shell, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert 'has no torch' not in out and 'cannot import torch' not in out
    if '--help' in command:
        assert 'usage:' in out, out[-3000:]


@pytest.mark.dist
def test_the_doctors_first_readme_command_runs_as_written(bare_shell):
    command = next(c for c in HOW if 'ddp_doctor.py' in c)
    done = _run(command, bare_shell, timeout=600)
    assert done.returncode == 1, (done.stdout + done.stderr)[-3000:]  # CRASHES, as the README shows
    assert ('config as written runs DDP with find_unused_parameters=False (model_wrapper_cfg): '
            'CRASHES under DDP') in done.stdout
    assert '  backbone.layer4      15  8393728  never used' in done.stdout
