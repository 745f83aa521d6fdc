"""The multi-process tests fork their ranks from zygotes (``mmddp_hooks.testing.reuse_ranks``):
torch, MMEngine and what earlier runs imported (mmseg, mmdet) are imported once per session instead of
once per run, and each run still gets new processes, so nothing a run did reaches the next one.
``MMDDP_FRESH_RANKS=1`` runs every case in fresh interpreters."""
import os

from mmddp_hooks.testing import reuse_ranks


def pytest_configure(config) -> None:
    reuse_ranks(os.environ.get('MMDDP_FRESH_RANKS') != '1')
