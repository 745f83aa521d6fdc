"""The multi-process tests run on warm ranks (``mmddp_hooks.testing.reuse_ranks``): torch, MMEngine
and the test modules are imported once per world size instead of once per run. A run in which a rank
failed, hung or died replaces its warm ranks, so nothing it left behind reaches the next test.
``MMDDP_FRESH_RANKS=1`` runs every case in fresh processes, as before."""
import os

from mmddp_hooks.testing import reuse_ranks


def pytest_configure(config) -> None:
    reuse_ranks(os.environ.get('MMDDP_FRESH_RANKS') != '1')
