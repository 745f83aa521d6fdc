"""What :func:`mmddp_hooks.ranks.run_on_ranks` returns: each rank's exit, value, error and output."""
from dataclasses import dataclass, field
from typing import Any, List, Optional

OUTPUT_TAIL_CHARS = 6000


class DistTestFailure(AssertionError):
    """Raised by :meth:`DistRunResult.values` when any rank failed, hung or was killed."""


class DistTeardownFault(DistTestFailure):
    """Every rank did its work and wrote its result, but some rank then died while exiting."""


@dataclass
class RankResult:
    rank: int
    exitcode: Optional[int]
    value: Any = None
    error: Optional[str] = None
    output: str = ''
    has_value: bool = False  # its work returned and the result file holds the value

    @property
    def ok(self) -> bool:
        return self.exitcode == 0 and self.error is None

    @property
    def finished(self) -> bool:
        """The rank's work returned and its result was written (whatever happened at exit)."""
        return self.error is None and self.has_value

    @property
    def teardown_fault(self) -> bool:
        """Finished its work, wrote its result, then exited non-zero (e.g. SIGABRT at exit)."""
        return self.finished and self.exitcode != 0


@dataclass
class DistRunResult:
    world_size: int
    timed_out: bool
    elapsed: float
    ranks: List[RankResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(r.ok for r in self.ranks)

    @property
    def work_done(self) -> bool:
        """Every rank finished its work and wrote its result (a fault at exit may follow)."""
        return not self.timed_out and all(r.finished for r in self.ranks)

    @property
    def teardown_fault(self) -> bool:
        """The work succeeded on every rank, but some rank died while exiting."""
        return self.work_done and not self.ok

    def describe(self) -> str:
        head = (f'{self.world_size} ranks, {self.elapsed:.1f}s'
                + (', TIMED OUT (process group killed)' if self.timed_out else '')
                + (', TEARDOWN FAULT: every rank finished its work and wrote its result, then '
                   'a rank died at exit' if self.teardown_fault else ''))
        parts = [head]
        for r in self.ranks:
            status = ('ok' if r.ok else
                      f'finished its work, then died at exit (exit code {r.exitcode})'
                      if r.teardown_fault else f'FAILED (exit code {r.exitcode})')
            parts.append(f'--- rank {r.rank}: {status}')
            if r.error:
                parts.append(r.error.rstrip())
            if r.output.strip():
                parts.append('[output]\n' + r.output[-OUTPUT_TAIL_CHARS:].rstrip())
        return '\n'.join(parts)

    def values(self) -> List[Any]:
        """Each rank's return value, or :class:`DistTestFailure` with every rank's output."""
        if not self.ok:
            raise (DistTeardownFault if self.teardown_fault else DistTestFailure)(self.describe())
        return [r.value for r in self.ranks]

