"""HangWatchdogHook: when a rank stops making progress, say which rank, where, and what the others
wait in, within seconds, instead of a silent stall until the collective timeout."""
import time
from typing import List, Optional

from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import BaseLoop

from .. import dist as ddist
from ..watchdog import BETWEEN, HangWatcher, peer_connection_broke


class PeerLost(RuntimeError):
    """This rank's training failed because peers are gone; the message names them."""


@HOOKS.register_module()
class HangWatchdogHook(Hook):
    """Watch every rank's progress through the c10d store; report (or abort) when one stalls.

    A thread on each rank posts, once per ``interval``, a heartbeat with its iteration and phase
    (train_step, val, checkpoint, between iterations) to the process group's store, a channel
    beside the collectives that may be hung, and watches one other rank's heartbeat: four store
    requests per rank and interval at any number of ranks (the protocol:
    :mod:`mmddp_hooks.watchdog`). When some rank has made no progress for the timeout, every live
    rank posts its main thread's Python stack, and one rank writes a single report to the log and
    ``work_dir/hang_report.txt``: ranks grouped by where they are (the innermost frame of user
    code, and what they wait in), the straggler named, and ranks whose heartbeat stopped named as
    dead or unreachable.

    Args:
        timeout: seconds without progress that make a hang. ``None``: ``max(min_timeout,
            step_factor x the slowest training step so far)``, and ``first_factor`` times that
            until a step has finished, so a slow first iteration, a val loop or a checkpoint save
            is not called a hang.
        action: 'report' logs and keeps waiting (and reports again if the stall lasts another
            timeout); 'abort' ends every rank with the report on stderr and exit code 70, so the
            launcher exits promptly.
        interval: seconds between heartbeats.
    """

    priority = 'HIGHEST'

    def __init__(self, timeout: Optional[float] = None, action: str = 'report',
                 interval: float = 1.0, min_timeout: float = 300.0, step_factor: float = 20.0,
                 first_factor: float = 3.0, report_file: str = 'hang_report.txt') -> None:
        self.watcher = HangWatcher(timeout, action, interval, min_timeout, step_factor,
                                   first_factor, report_file)
        self._step_start = 0.0

    @property
    def reports(self) -> List[str]:
        return self.watcher.reports

    @property
    def beats(self) -> int:
        return self.watcher.beats

    def start(self, work_dir: str) -> None:
        """Start this rank's watcher thread (``before_run`` does; the benchmark, without a Runner)."""
        self.watcher.start(work_dir)

    def stop(self) -> None:
        self.watcher.stop()

    def before_run(self, runner) -> None:
        if not ddist.is_dist():
            return
        self.start(runner.work_dir)
        if isinstance(runner._train_loop, BaseLoop):  # built by runner.train(), not by val/test
            self._name_lost_peers(runner._train_loop)

    def _name_lost_peers(self, loop) -> None:
        """A peer that dies (SIGKILL, the OOM killer, a segfault) is no hang on gloo: the others'
        collectives raise at once ("Connection closed by peer"), naming no rank. MMEngine has no
        hook for an exception, so the loop's ``run`` is wrapped: on an error that says a peer's
        connection broke, the ranks whose heartbeats stopped are named, with where they last were,
        and the error is the cause."""
        run = loop.run

        def run_naming_lost_peers():
            try:
                return run()
            except Exception as e:
                lost = self.watcher.lost_peers() if peer_connection_broke(e) else ''
                if lost:
                    raise PeerLost(f'{lost}\nThis rank\'s error, a consequence: {e!r}') from e
                raise
        loop.run = run_naming_lost_peers

    def after_run(self, runner) -> None:
        self.stop()

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._step_start = time.time()
        self.watcher.mark('train_step', runner.iter + 1)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self.watcher.step_took(time.time() - self._step_start)
        self.watcher.mark(BETWEEN)

    def before_val(self, runner) -> None:
        self.watcher.mark('val')

    def after_val_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self.watcher.mark('val')

    def after_val(self, runner) -> None:
        self.watcher.mark(BETWEEN)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        self.watcher.mark('checkpoint')
