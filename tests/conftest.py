"""The multi-process tests fork their ranks from zygotes (``mmddp_hooks.ranks.reuse_ranks``):
torch, MMEngine and what earlier runs imported (mmseg, mmdet) are imported once per session instead of
once per run, and each run still gets new processes, so nothing a run did reaches the next one.
``MMDDP_FRESH_RANKS=1`` runs every case in fresh interpreters.

Under pytest-xdist's ``--dist loadfile`` (``make test``), a test file is one unit of work, but a file
whose module-scoped fixture trains on 2 and on 3 ranks is two: ``[2ranks-...]`` and ``[3ranks-...]``,
each running its own fixture, on either worker. Units are handed out longest first (seconds measured
under two workers, ``LONGEST``), so no worker is left with a long unit at the end.

Every test starts from the same global random state (``same_draws``): which files ran earlier in a
worker's process changes from run to run, and so would every unseeded draw of a test that runs in it
(a transform's crop or flip, a Runner's ``seed=None``)."""
import importlib.util
import os
import random
import re
import sys
from functools import partial
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
import torch

from mmddp_hooks.ranks import reuse_ranks

pytest_plugins = ('pytester',)  # test_harness runs a pytest session with broken tests in it

# tools/*.py, benchmarks/ and projects/ (the repository root) are imported by tests and by ranks. On
# sys.path from the start, once: the ranks get sys.path as their PYTHONPATH, and a change to it
# mid-session starts new zygotes (the imports again).
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, str(Path(__file__).parents[1] / 'tools'))

# seconds each took under `make test` (two workers, 6:04 on 2026-12-04, `--durations=0` summed per
# unit); units not named here go after these, in file order
LONGEST = {
    'tests/test_mmdet_integration.py': 130, 'tests/test_zoo_configs.py': 113,
    'tests/test_harness.py': 65, 'tests/test_hang_watchdog.py': 50, 'tests/test_launchers.py': 48,
    'tests/test_mmseg_integration.py': 47, 'tests/test_trainable.py::3ranks': 44,
    'tests/test_contract.py::3ranks': 38, 'tests/test_sanity_hooks.py': 35,
    'tests/test_autotune_runner.py': 26, 'tests/test_trainable.py::2ranks': 20,
    'tests/test_contract.py::2ranks': 18, 'tests/test_contrastive.py': 17,
    'tests/test_benchmark.py': 16, 'tests/test_trainable.py': 13, 'tests/test_synthetic.py': 11,
    'tests/test_branches.py': 9, 'tests/test_readme_commands.py': 90, 'tests/test_pose_video.py': 75,
    'tests/test_research_code.py': 40, 'tests/test_arrival.py': 25, 'tests/test_late_freeze.py': 18,
}
_RANKS = re.compile(r'\[(\d+ranks)[-\]]')

# What a test needs beyond torch and mmengine 0.7: ``@pytest.mark.needs('torchvision', ...)``, or a
# codebase marker (mmseg, mmdet, mmpretrain). Where one is missing the test is skipped, saying which:
# `make test-compat`'s side venvs have torch and mmengine only.
def _installed(package: str) -> Optional[str]:
    return None if importlib.util.find_spec(package) else f'{package} is not installed'


def _new_style_configs() -> Optional[str]:
    from mmddp_hooks.compat import lazy_configs_supported, mmengine_release

    return None if lazy_configs_supported() else \
        f"mmengine {'.'.join(map(str, mmengine_release()))} cannot read new-style configs (read_base)"


NEEDS = {**{p: partial(_installed, p) for p in ('torchvision', 'mmcv', 'mmseg', 'mmdet',
                                                  'mmpretrain', 'mmpose', 'mmaction')},
         'new-style configs': _new_style_configs}
_WHY: Dict[str, Optional[str]] = {}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        needed = [p for m in item.iter_markers('needs') for p in m.args]
        needed += [name for name in NEEDS if item.get_closest_marker(name) and name not in needed]
        unknown = set(needed) - set(NEEDS)
        if unknown:
            raise pytest.UsageError(f'{item.nodeid}: needs {sorted(unknown)}: not one of {list(NEEDS)}')
        for name in needed:
            if name not in _WHY:
                _WHY[name] = NEEDS[name]()
        why = [_WHY[n] for n in needed if _WHY[n]]
        if why:
            item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(needed)}: {'; '.join(why)}"))


@pytest.fixture(autouse=True)
def same_draws() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def pytest_configure(config) -> None:
    reuse_ranks(os.environ.get('MMDDP_FRESH_RANKS') != '1')


@pytest.hookimpl(optionalhook=True)  # environments without pytest-xdist (make test-compat)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue('dist') != 'loadfile':
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongestFirst(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            ranks = _RANKS.search(nodeid)
            scope = super()._split_scope(nodeid)
            return f'{scope}::{ranks.group(1)}' if ranks else scope

        def _assign_work_unit(self, node) -> None:
            longest = max(self.workqueue, key=lambda scope: LONGEST.get(scope, 0))
            self.workqueue.move_to_end(longest, last=False)
            super()._assign_work_unit(node)

    return LongestFirst(config, log)
