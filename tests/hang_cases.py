"""Ranks that hang, and runs that are slow but progressing, for HangWatchdogHook.

At iteration HANG (MMEngine's 1-based count) rank 1 sleeps for ever in forward, loops for ever in
forward, or sleeps for ever in its dataset's ``__getitem__``, while rank 0 goes on into the step's
collectives and waits there.
"""
import os
import signal
import tempfile
import time
from typing import Any, Dict, Optional

import torch.distributed as dist
from mmengine.registry import DATASETS, MODELS

import scenarios

HANG = 6  # the iteration whose step hangs on rank 1
WATCH = dict(type='HangWatchdogHook', timeout=4, action='abort', interval=0.5)


class SleepsInForward(scenarios.ScenarioModel):
    def branch(self, h, index):
        if dist.get_rank() == 1 and self.steps == HANG - 1:
            time.sleep(3600)  # the line the report must name
        return h


class SleepsInForwardAlone(scenarios.ScenarioModel):
    """Rank 0 of a one-rank NCCL run (the GPU tier) sleeps for ever in forward."""

    def branch(self, h, index):
        if self.steps == HANG - 1:
            time.sleep(3600)  # the line the report must name
        return h


class LoopsInForward(scenarios.ScenarioModel):
    def branch(self, h, index):
        if dist.get_rank() == 1 and self.steps == HANG - 1:
            while True:  # the line the report must name
                pass
        return h


class KilledInForward(scenarios.ScenarioModel):
    def branch(self, h, index):
        if dist.get_rank() == 1 and self.steps == HANG - 1:
            time.sleep(1.0)  # a heartbeat from this step first (they come every 0.5 s)
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
        return h


class StuckDataset(scenarios.RandomVectors):
    """Rank 1's sampler asks for sample 2 * (HANG - 1) + 1 in iteration HANG (batches of 2,
    num_workers=0): then it never returns."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.fetched = 0

    def __getitem__(self, i: int) -> Dict[str, Any]:
        self.fetched += 1
        if dist.get_rank() == 1 and self.fetched > 2 * (HANG - 1):
            time.sleep(3600)  # the line the report must name
        return super().__getitem__(i)


class SlowButProgressing(scenarios.ScenarioModel):
    """A long first iteration (3 s, over min_timeout), and rank 1 slower at every step."""

    def branch(self, h, index):
        if self.steps == 0:
            time.sleep(3.0)
        elif dist.get_rank() == 1:
            time.sleep(0.4)
        return h


for _cls in (SleepsInForward, SleepsInForwardAlone, LoopsInForward, KilledInForward,
             SlowButProgressing):
    scenarios.MODELS[_cls.__name__] = _cls
# for tests/configs/hang_net.py, the config the doctor runs
MODELS.register_module(module=SleepsInForward)
DATASETS.register_module(name='HangCaseVectors', module=scenarios.RandomVectors)


def hang(model: str = 'AllUsed', stuck_data: bool = False,
         work_dir: Optional[str] = None) -> Dict[str, Any]:
    """Train until rank 1 hangs at iteration HANG; the watchdog aborts every rank. ``work_dir``:
    where the report (and an NCCL dump) go; by default a folder that goes with the run."""
    return scenarios.train_plain(model, iters=12, extra_hooks=[WATCH], log_level='INFO',
                                 dataset=StuckDataset(64) if stuck_data else None,
                                 work_dir=work_dir)


def slow_but_progressing() -> Dict[str, Any]:
    """Derived timeout (min 2 s, 3x that before the first step ends), a 3 s first iteration, a
    slower rank, val loops and checkpoints: no report."""
    hook = dict(type='HangWatchdogHook', action='abort', interval=0.25, min_timeout=2.0)
    out = scenarios.train_plain('SlowButProgressing', iters=10, val_interval=3,
                                checkpoint_interval=4, extra_hooks=[hook])
    return dict(digest=out['digest'], losses=len(out['losses']))


def store_beside_the_watcher(rounds_wanted: int = 60, beats_wanted: int = 10) -> Dict[str, Any]:
    """The watcher thread posts heartbeats every 5 ms while this thread uses the same store as
    training code does (the trainable-set exchange, ``new_group``'s rendezvous): each must keep its
    answers, and no rank may crash (on torch 2.1, the watcher's ``compare_set`` made one segfault).
    Runs until both have done their share beside each other (counted, however slow the machine)."""
    from mmddp_hooks import dist as ddist
    from mmddp_hooks.hooks.hang_watchdog_hook import HangWatchdogHook

    hook = HangWatchdogHook(interval=0.005)
    hook.start(tempfile.mkdtemp(prefix='mmddp_watch_'))
    kv, rounds, first_beat = ddist.store(), 0, hook.beats
    while rounds < rounds_wanted or hook.beats - first_beat < beats_wanted:
        rounds += 1
        key = f'beside/{dist.get_rank()}/{rounds}'
        kv.set(key, str(rounds))
        assert kv.get(key) == str(rounds).encode() and kv.add('beside/count', 1) >= rounds
        # and Python between the calls, as training runs: the watcher's store calls run beside it
        assert sorted(str(i) for i in range(2000))[-1] == '999'
    beats = hook.beats - first_beat
    exchanged = ddist.store_agree('beside_the_watcher', (dist.get_rank(), rounds))
    hook.stop()
    return dict(rounds=rounds, beats=beats, exchanged=exchanged, reports=len(hook.reports))
