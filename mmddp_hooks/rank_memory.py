"""What a rank held when it died without a Python error: each doctor rank writes its memory and
stage to its work folder, so that a rank the kernel's OOM killer ends is still named, with what
it held and where it was."""
import os
import threading
from typing import Any, Callable, Dict, Optional

from .doctor_failure import RUNNING


def watch_memory(path: str, stage: Callable[[], str], interval: float = 0.5) -> Callable[[], None]:
    """Write this process's resident and peak memory (bytes) and its ``stage()`` to ``path`` now
    and every ``interval`` s, so that a rank the kernel kills leaves what it held, and where;
    returns the writer, to call when the stage changes."""
    def write() -> bool:
        try:
            fields = dict(line.split(':', 1) for line in open('/proc/self/status'))
            rss, peak = (int(fields[k].split()[0]) * 1024 for k in ('VmRSS', 'VmHWM'))
            with open(path + '.tmp', 'w') as f:
                f.write(f'{rss} {peak} {stage()}')
            os.replace(path + '.tmp', path)
        except (OSError, KeyError, ValueError):
            return False
        return True

    def loop() -> None:
        while write():
            threading.Event().wait(interval)
    write()
    threading.Thread(target=loop, name='mmddp-doctor-memory', daemon=True).start()
    return write


def _total_memory() -> Optional[int]:
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError):
        return None


def killed(rank: int, exitcode: int, memory_file: str, nproc: int) -> Dict[str, Any]:
    """A rank that ended by a signal (``exitcode`` < 0) or an exit code, without a Python error."""
    held, stage = None, RUNNING
    if os.path.exists(memory_file):
        rss, peak, stage = open(memory_file).read().split(' ', 2)
        held = max(int(rss), int(peak))
    gib = f'{held / 2 ** 30:.1f} GiB' if held else 'an unknown amount of memory'
    total = _total_memory()
    machine = f' of the {total / 2 ** 30:.0f} GiB this machine has, for {nproc} ranks' \
        if total else ''
    if exitcode == -9:
        return dict(stage=stage, rank=rank, kind='killed',
                    cause=f'the rank was killed (signal 9, exit code -9) holding {gib}{machine}: '
                          "most likely the kernel's OOM killer",
                    todo='Use less memory: a smaller per-rank batch (--batch-size; at most 2 by '
                         'default), a smaller input (--size H W) or fewer ranks (--nproc).')
    return dict(stage=stage, rank=rank, kind='killed',
                cause=f'the rank ended with exit code {exitcode} without a Python error, holding '
                      f'{gib} (a crash in native code?)',
                todo="--debug prints every rank's output.")
