"""The multi-process harness itself: results, tracebacks, and hangs that are killed, not waited on."""
import os
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist

from mmddp_hooks.ranks import DistTeardownFault, DistTestFailure, run_distributed, run_on_ranks

import scenarios

pytestmark = pytest.mark.dist


def _all_reduce_rank() -> float:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return t.item()


def _raise_on_rank_1() -> int:
    if dist.get_rank() == 1:
        raise ValueError('boom on rank one')
    return dist.get_rank()


def _hang_in_collective() -> int:
    print(f'rank {dist.get_rank()} pid {os.getpid()} before collective', flush=True)
    if dist.get_rank() == 0:
        time.sleep(3600)  # never joins: rank 1 waits in all_reduce forever
    dist.all_reduce(torch.ones(1))
    return 0


def _abort_at_exit_on_rank_1() -> int:
    """Do the work, then die while the interpreter exits (after the result is written)."""
    import atexit

    if dist.get_rank() == 1:
        atexit.register(os.abort)
    return dist.get_rank()


def _report_env() -> dict:
    return {k: os.environ[k] for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')} | {
        'backend': dist.get_backend()}


def test_three_rank_all_reduce():
    assert run_distributed(_all_reduce_rank, 3, timeout=60) == [6.0, 6.0, 6.0]


def test_ranks_see_torchrun_env_and_gloo():
    envs = run_distributed(_report_env, 2, timeout=60)
    assert envs == [{'RANK': str(r), 'LOCAL_RANK': str(r), 'WORLD_SIZE': '2', 'backend': 'gloo'}
                    for r in range(2)]


def test_raising_rank_is_reported_with_traceback():
    result = run_on_ranks(_raise_on_rank_1, 2, timeout=60, failure_grace=1)
    assert not result.ok and not result.timed_out
    # rank 0 returned, then its teardown barrier lost its peer: reported, not hidden
    assert result.ranks[0].exitcode is not None
    assert 'ValueError: boom on rank one' in result.ranks[1].error
    assert '_raise_on_rank_1' in result.ranks[1].error  # a traceback, not just the message
    with pytest.raises(DistTestFailure, match='boom on rank one'):
        result.values()


def test_hung_collective_is_killed_within_timeout():
    # timed out: the deadline passed with the ranks running; killed (SIGKILL) by the harness then,
    # not left to end by themselves (the hang would stop this test otherwise)
    result = run_on_ranks(_hang_in_collective, 2, timeout=8)
    assert result.timed_out
    for r in result.ranks:
        assert r.exitcode == -9, r  # SIGKILL from the harness
        assert 'before collective' in r.output
        pid = int(r.output.split('pid ')[1].split()[0])
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(DistTestFailure, match='TIMED OUT'):
        result.values()
    # each killed rank says where it was: rank 0 in the sleep, rank 1 in the collective
    line = _hang_in_collective.__code__.co_firstlineno + 3
    assert f'test_harness.py", line {line} in _hang_in_collective' in result.ranks[0].error
    assert 'where it was when killed' in result.ranks[1].error
    assert 'all_reduce' in result.ranks[1].error, result.ranks[1].error


@pytest.mark.parametrize('fresh', [True, False], ids=['fresh', 'forked'])
def test_abort_at_exit_is_a_teardown_fault_not_a_failed_rank(fresh):
    # a forked rank runs the exit functions a fresh interpreter would
    result = run_on_ranks(_abort_at_exit_on_rank_1, 2, timeout=60, fresh=fresh)
    assert result.work_done and result.teardown_fault and not result.ok
    assert result.ranks[1].exitcode == -6 and result.ranks[1].value == 1  # SIGABRT, value kept
    assert result.ranks[0].ok  # its peer was not killed as if waiting on a failed rank
    with pytest.raises(DistTeardownFault, match='TEARDOWN FAULT.*\n.*\n--- rank 1: finished its '
                                                'work, then died at exit'):
        result.values()
    failed = run_on_ranks(_raise_on_rank_1, 2, timeout=60, fresh=fresh, failure_grace=1)
    assert not failed.work_done and not failed.teardown_fault


def test_teardown_joins_the_gloo_threads_a_finished_runner_still_holds():
    census = run_distributed(scenarios.gloo_threads_around_teardown, 2, timeout=120, fresh=True)
    for r in census:
        # a gloo group runs two worker threads (and a transport loop): joined before Python exits
        assert r['during'] - r['after'] >= 2, r


# ------------------------------------------------------- ranks forked from zygotes (tests/conftest.py)
def _whoami_and_leave_state() -> dict:
    """What a run sees of the runs before it, then leave some state and import a module."""
    seen = dict(pid=os.getpid(), leftover=os.environ.get('MMDDP_LEFTOVER'),
                seed=torch.initial_seed(), port=os.environ['MASTER_PORT'],
                groups=dist.get_world_size(), hash=hash('mmddp'), ppid=os.getppid(),
                imported='xml.dom.minidom' in sys.modules)
    os.environ['MMDDP_LEFTOVER'] = 'from an earlier run'
    torch.manual_seed(1234)
    import xml.dom.minidom  # noqa: F401 - learned by the zygotes: the next run starts with it
    return seen


def _crash_rank_1() -> int:
    if dist.get_rank() == 1:
        os._exit(3)  # as a segfault would: no result, no traceback
    dist.all_reduce(torch.ones(1))
    return 0


def _write_a_temp_dir() -> str:
    """A work_dir as the cases make them, with a file in it."""
    path = tempfile.mkdtemp(prefix='mmddp_case_')
    with open(os.path.join(path, 'iter_1.pth'), 'wb') as f:
        f.write(b'x' * 1024)
    return path


def test_a_runs_temporary_files_go_with_it():
    # each case's tempfile.mkdtemp() work_dirs once stayed in /tmp: 3 GB a suite, until a disk
    # filled and every later rank died with neither output nor result
    first, second = (run_distributed(_write_a_temp_dir, 2, timeout=60) for _ in range(2))
    for path in first + second:
        assert not os.path.exists(path), path
    # a warm rank takes each run's TMPDIR, not the one tempfile cached in its first run
    assert os.path.dirname(first[0]) == os.path.dirname(first[1])
    assert os.path.dirname(first[0]) != os.path.dirname(second[0])


def test_each_run_gets_new_ranks_with_what_earlier_runs_imported_but_not_their_state():
    first, second = (run_distributed(_whoami_and_leave_state, 2, timeout=60) for _ in range(2))
    assert {r['pid'] for r in first}.isdisjoint(r['pid'] for r in second)  # new processes
    assert [r['ppid'] for r in first] == [r['ppid'] for r in second]  # forked by the same zygotes
    assert first[0]['ppid'] != first[1]['ppid']  # one zygote per rank index
    for a, b in zip(first, second):
        assert b['leftover'] is None and b['seed'] == a['seed'] and b['port'] != a['port']
        assert b['groups'] == 2 and b['imported']  # xml.dom.minidom: imported by the zygotes
    if 'PYTHONHASHSEED' not in os.environ:  # as fresh interpreters, each rank its own hash seed
        assert first[0]['hash'] != first[1]['hash']


@pytest.mark.parametrize('broken', ['hang', 'crash', 'raise'])
def test_a_broken_run_fails_alone_and_the_next_run_gets_fresh_ranks(broken):
    before = run_distributed(_whoami_and_leave_state, 2, timeout=60)
    if broken == 'hang':
        result = run_on_ranks(_hang_in_collective, 2, timeout=5)
        assert result.timed_out and [r.exitcode for r in result.ranks] == [-9, -9]
    elif broken == 'crash':
        result = run_on_ranks(_crash_rank_1, 2, timeout=60, failure_grace=1)
        assert result.ranks[1].exitcode == 3 and not result.ranks[1].has_value
        # no output and no result: the error says how much disk the rank had to write them on
        assert 'printed nothing; ' in result.ranks[1].error
        assert 'MiB free on the disk of ' in result.ranks[1].error
    else:
        result = run_on_ranks(_raise_on_rank_1, 2, timeout=60, failure_grace=1)
        assert 'ValueError: boom on rank one' in result.ranks[1].error
    assert not result.ok
    after = run_distributed(_whoami_and_leave_state, 2, timeout=60)
    assert {r['pid'] for r in after}.isdisjoint(r['pid'] for r in before)  # new ranks
    assert all(r['leftover'] is None for r in after)


SESSION_WITH_BROKEN_TESTS = """
from mmddp_hooks.ranks import run_distributed
from test_harness import _all_reduce_rank, _crash_rank_1, _hang_in_collective


def test_hangs():
    run_distributed(_hang_in_collective, 2, timeout=5)


def test_crashes():
    run_distributed(_crash_rank_1, 2, timeout=60, failure_grace=1)


def test_runs_after_them():
    assert run_distributed(_all_reduce_rank, 2, timeout=60) == [3.0, 3.0]
"""


@pytest.fixture
def session_ranks() -> tuple:
    """The session's environment, and the zygotes its ranks are forked from, before pytester sets
    HOME and PY_COLORS (another environment would give the ranks new zygotes)."""
    zygotes = [r['ppid'] for r in run_distributed(_whoami_and_leave_state, 2, timeout=60)]
    return dict(os.environ), zygotes


def test_a_hanging_and_a_crashing_test_fail_alone_and_the_next_test_passes(session_ranks, pytester,
                                                                           monkeypatch):
    # the check as a user meets it: one pytest session, with this session's ranks
    env, zygotes = session_ranks
    for key, value in env.items():
        if key != 'PYTEST_CURRENT_TEST' and os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    for key in set(os.environ) - set(env):
        monkeypatch.delenv(key)
    pytester.makepyfile(test_broken=SESSION_WITH_BROKEN_TESTS)
    # importlib: the test file's folder stays off sys.path, which the ranks get as PYTHONPATH
    result = pytester.runpytest_inprocess('-p', 'no:cacheprovider', '-p', 'no:xdist',
                                          '--import-mode=importlib')
    result.assert_outcomes(failed=2, passed=1)
    out = result.stdout.str()
    assert 'FAILED test_broken.py::test_hangs' in out and 'TIMED OUT (process group killed)' in out
    assert 'FAILED test_broken.py::test_crashes' in out and 'rank 1: FAILED (exit code 3)' in out
    assert [r['ppid'] for r in run_distributed(_whoami_and_leave_state, 2, timeout=60)] == zygotes
