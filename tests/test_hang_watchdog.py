"""HangWatchdogHook through a Runner on 2 gloo ranks (tests/hang_cases.py): a rank that hangs is
named with its line, the others with what they wait in, and every rank ends (action='abort');
a run that is slow but progressing is never called a hang."""
import inspect
import os
import re
import signal
import sys

import hang_cases
import pytest

from mmddp_hooks.doctor import HANGS
from mmddp_hooks.ranks import run_distributed, run_on_ranks
from mmddp_hooks.watchdog import ABORT_EXIT_CODE, describe_hang

import launch

MARK = 'the line the report must name'
HANG_CONFIG = launch.ROOT / 'tests' / 'configs' / 'hang_net.py'


def _line(cls) -> int:
    lines, start = inspect.getsourcelines(cls)
    return start + next(i for i, text in enumerate(lines) if MARK in text)


@pytest.mark.dist
@pytest.mark.parametrize('model, stuck_data, phase, where', [
    ('SleepsInForward', False, 'train_step (iteration 6)',
     rf'hang_cases.py:{_line(hang_cases.SleepsInForward)} in branch'),
    ('LoopsInForward', False, 'train_step (iteration 6)',
     rf'hang_cases.py:({_line(hang_cases.LoopsInForward)}|{_line(hang_cases.LoopsInForward) + 1})'
     r' in branch'),
    ('AllUsed', True, 'between iterations',
     rf'hang_cases.py:{_line(hang_cases.StuckDataset)} in __getitem__, in the dataloader'),
], ids=['sleeps_in_forward', 'loops_in_forward', 'stuck_in_dataloader'])
def test_the_stuck_rank_is_named_and_every_rank_ends(model, stuck_data, phase, where):
    result = run_on_ranks(hang_cases.hang, 2, args=(model, stuck_data), timeout=90,
                          failure_grace=30)
    assert not result.timed_out, result.describe()
    # every rank ends by itself (code 70; or a peer's exit broke its collective first), none killed
    # by a signal (the harness's, after the grace), report printed
    assert all(r.exitcode > 0 for r in result.ranks), result.describe()
    assert ABORT_EXIT_CODE in [r.exitcode for r in result.ranks], result.describe()
    for r in result.ranks:  # every rank's output on a failure: the straggler's says why
        assert re.search(rf'STRAGGLER: rank 1 is in {re.escape(phase)}.*? at \S*{where}',
                         r.output), result.describe()
        assert ('rank 0: train_step (iteration 6) at ' in r.output
                and "waiting in backward, where DDP all-reduces the gradients" in r.output), \
            result.describe()
    assert 'no progress for 4 s on 2 ranks' in result.ranks[0].output


@pytest.mark.dist
def test_a_rank_killed_mid_run_is_named_by_the_ranks_it_leaves_behind():
    # on gloo a dead peer is no hang: rank 0's all-reduce raises at once, naming no rank
    result = run_on_ranks(hang_cases.hang, 2, args=('KilledInForward',), timeout=90,
                          failure_grace=30)
    assert not result.timed_out, result.describe()
    assert result.ranks[1].exitcode == -signal.SIGKILL
    assert result.ranks[0].exitcode > 0, result.describe()  # ended by itself, not by the harness
    error = result.ranks[0].error or ''
    assert 'PeerLost: [mmddp_hooks] HangWatchdogHook: rank 0 lost 1 peer(s)' in error, error[-3000:]
    assert re.search(r'rank 1: its last heartbeat was \d+\.\d s before this rank.s error, in '
                     r'train_step \(iteration 6\), and none came in the 3 s after it', error), error
    assert "This rank's error, a consequence: " in error


@pytest.mark.dist
def test_slow_but_progressing_runs_are_not_called_hangs():
    rows = run_distributed(hang_cases.slow_but_progressing, 2, timeout=120)
    assert [r['losses'] for r in rows] == [10, 10]
    assert len({r['digest'] for r in rows}) == 1


def test_a_rank_that_posted_nothing_is_named_dead_or_unreachable():
    stacks = {0: dict(phase='train_step', iter=6, frames=[
        ('/x/site-packages/torch/autograd/graph.py', 823, '_engine_run_backward')])}
    beats = {0: dict(beat=100.0, phase='train_step', iter=6),
             1: dict(beat=80.0, phase='train_step', iter=6)}
    text = describe_hang(stacks, beats, 2, 10.0, now=101.0)
    assert 'rank 1: dead or unreachable (its last heartbeat was 21 s ago, in train_step ' \
           '(iteration 6)' in text
    assert "rank 0: train_step (iteration 6) at no frame of user code, waiting in backward" in text


@pytest.mark.dist
def test_the_doctor_gives_a_hanging_config_its_own_verdict():
    code, out = launch.run([sys.executable, 'tools/ddp_doctor.py', str(HANG_CONFIG), '--real-data',
                            '--iters', '8', '--hang-timeout', '4'], timeout=120,
                           # this checkout's package, not an installed one's: tools/ then
                           # runs the package it ships with
                           PYTHONPATH=os.pathsep.join([str(launch.ROOT), str(launch.ROOT / 'tests')]))
    assert code == HANGS, out[-3000:]  # the doctor's own verdict, not launch.run's timeout
    assert 'hang_net.py HANGS under DDP:' in out and 'no progress for 4 s on 2 ranks' in out
    assert re.search(rf'STRAGGLER: rank 1 is in train_step \(iteration 6\) at \S*hang_cases.py:'
                     rf'{_line(hang_cases.SleepsInForward)} in branch', out), out[-3000:]
    assert 'rank 0: train_step (iteration 6) at ' in out


def test_the_report_names_each_rank_s_nccl_flight_recorder_dump():
    frames = [('/x/site-packages/torch/autograd/graph.py', 823, '_engine_run_backward')]
    stacks = {r: dict(phase='train_step', iter=6, frames=frames,
                      nccl_trace=f'/work/nccl_trace_rank{r}.pkl') for r in (0, 1)}
    beats = {r: dict(beat=100.0, phase='train_step', iter=6) for r in (0, 1)}
    text = describe_hang(stacks, beats, 2, 10.0, now=101.0)
    assert ("NCCL flight recorder (torch's pickled trace of each rank's collectives): rank 0: "
            '/work/nccl_trace_rank0.pkl, rank 1: /work/nccl_trace_rank1.pkl') in text


@pytest.mark.dist
def test_the_watcher_and_training_code_use_the_store_at_once_without_harm():
    rows = run_distributed(hang_cases.store_beside_the_watcher, 2, timeout=60)
    for r in rows:
        # each rank went on until it had done 60 rounds and its watcher 10 beats (a beat every
        # 5 ms; on torch 2.1 each also waits 100 ms to learn there is no alarm), beside each other
        assert r['rounds'] >= 60 and r['beats'] >= 10 and r['reports'] == 0, r
        assert r['exchanged'] == {0: (0, rows[0]['rounds']), 1: (1, rows[1]['rounds'])}
