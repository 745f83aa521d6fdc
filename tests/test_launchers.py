"""Launch as OpenMMLab users do on clusters, on this one machine: ``tools/slurm_train.sh`` through a
fake ``srun`` (tests/fake_slurm), and ``tools/dist_train.sh`` as two nodes of one rank each, so that
global rank 1 is local rank 0 of node 1. The plan, the guard's control plane and the replica check
must work across the nodes as on one.

Each launch runs under a hard timeout in its own process group (killed whole on expiry).
"""
import json
import os
import signal
import subprocess

import pytest

from mmddp_hooks.dist import slurm_env
from mmddp_hooks.ranks import free_port

import launch

ROOT = launch.ROOT
CONFIG = ROOT / 'tests' / 'configs' / 'fcn_r18_stage4-unused_rank-record.py'
ARGS = ['--synthetic', '64', '64', '--iters', '12']
FAKE_SLURM = ROOT / 'tests' / 'fake_slurm'
RECORDER = dict(PYTHONPATH=str(ROOT / 'tests' / 'configs'))  # rank_record.py, the config's import


def check_two_nodes(work_dir, out: str) -> None:
    records = [json.loads((work_dir / 'ranks' / f'rank{r}.json').read_text()) for r in (0, 1)]
    assert [(r['rank'], r['world_size'], r['local_rank'], r['node']) for r in records] == [
        (0, 2, 0, 0), (1, 2, 0, 1)], records
    plan = records[0]['plan']
    assert plan['find_unused_parameters'] is False
    assert 'backbone.layer4.0.conv1.weight' in plan['ignore']
    assert all(r['plan'] == plan and r['guarded'] for r in records)
    assert all(r['control_plane'] == [0, 1] for r in records)
    assert records[0]['digest'] == records[1]['digest']
    assert '  backbone.layer4      15  8393728  never used' in out
    assert 'replicas bit-identical on 2 ranks at iteration 12' in out


@pytest.mark.dist
@pytest.mark.mmseg
def test_slurm_train_through_srun_on_two_nodes(tmp_path):
    code, out = launch.run(
        ['bash', 'tools/slurm_train.sh', 'debug', 'fcn-r18', str(CONFIG), str(tmp_path), *ARGS],
        PATH=f'{FAKE_SLURM}:{os.environ["PATH"]}', GPUS='2', GPUS_PER_NODE='1', GRES='',
        PORT=str(free_port()), **RECORDER)
    assert code == 0, out[-5000:]
    assert 'launcher: slurm' in out
    check_two_nodes(tmp_path, out)


@pytest.mark.dist
@pytest.mark.mmseg
def test_dist_train_as_two_nodes(tmp_path):
    env = dict(NNODES='2', MASTER_ADDR='127.0.0.1', PORT=str(free_port()), TMPDIR=str(tmp_path),
               **RECORDER)
    cmd = ['bash', 'tools/dist_train.sh', str(CONFIG), '1', '--work-dir', str(tmp_path), *ARGS]
    nodes = [launch.start(cmd, NODE_RANK=str(n), **env) for n in (0, 1)]
    outs = []
    try:
        for node in nodes:
            outs.append(node.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
        pytest.fail('a node timed out:\n' + '\n'.join(o[-3000:] for o in outs))
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert [n.returncode for n in nodes] == [0, 0], '\n'.join(o[-3000:] for o in outs)
    check_two_nodes(tmp_path, outs[0])


def test_slurm_env_is_what_mmengine_derives():
    env = dict(SLURM_PROCID='3', SLURM_NTASKS='4', SLURM_NODELIST='gpu[7-8]', SLURM_LOCALID='1',
               MASTER_ADDR='10.1.2.3')
    assert slurm_env(env) == dict(RANK='3', WORLD_SIZE='4', LOCAL_RANK='1', MASTER_PORT='29500',
                                  MASTER_ADDR='10.1.2.3')
    assert slurm_env(dict(env, MASTER_PORT='23456'))['MASTER_PORT'] == '23456'


def test_slurm_env_takes_the_first_node_from_scontrol(monkeypatch):
    monkeypatch.setenv('PATH', f'{FAKE_SLURM}:{os.environ["PATH"]}')
    env = dict(SLURM_PROCID='0', SLURM_NTASKS='2', SLURM_NODELIST='fakenode[0-1]')
    assert slurm_env(env)['MASTER_ADDR'] == '127.0.0.1'


def test_slurm_env_outside_srun_says_so():
    with pytest.raises(RuntimeError, match='SLURM_PROCID, SLURM_NTASKS, SLURM_NODELIST not set'):
        slurm_env({})
