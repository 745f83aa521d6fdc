"""The multi-process harness itself: results, tracebacks, and hangs that are killed, not waited on."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from mmddp_hooks.testing import DistTeardownFault, DistTestFailure, run_distributed, run_on_ranks

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
    result = run_on_ranks(_raise_on_rank_1, 2, timeout=60)
    assert not result.ok and not result.timed_out
    # rank 0 returned, then its teardown barrier lost its peer: reported, not hidden
    assert result.ranks[0].exitcode is not None
    assert 'ValueError: boom on rank one' in result.ranks[1].error
    assert '_raise_on_rank_1' in result.ranks[1].error  # a traceback, not just the message
    with pytest.raises(DistTestFailure, match='boom on rank one'):
        result.values()


def test_hung_collective_is_killed_within_timeout():
    start = time.monotonic()
    result = run_on_ranks(_hang_in_collective, 2, timeout=8)
    elapsed = time.monotonic() - start
    assert result.timed_out
    assert elapsed < 20, elapsed
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


def test_abort_at_exit_is_a_teardown_fault_not_a_failed_rank():
    result = run_on_ranks(_abort_at_exit_on_rank_1, 2, timeout=60)
    assert result.work_done and result.teardown_fault and not result.ok
    assert result.ranks[1].exitcode == -6 and result.ranks[1].value == 1  # SIGABRT, value kept
    assert result.ranks[0].ok  # its peer was not killed as if waiting on a failed rank
    with pytest.raises(DistTeardownFault, match='TEARDOWN FAULT.*\n.*\n--- rank 1: finished its '
                                                'work, then died at exit'):
        result.values()
    failed = run_on_ranks(_raise_on_rank_1, 2, timeout=60)
    assert not failed.work_done and not failed.teardown_fault


def test_teardown_joins_the_gloo_threads_a_finished_runner_still_holds():
    census = run_distributed(scenarios.gloo_threads_around_teardown, 2, timeout=120)
    for r in census:
        # a gloo group runs two worker threads (and a transport loop): joined before Python exits
        assert r['during'] - r['after'] >= 2, r
