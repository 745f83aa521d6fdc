"""Run a function on N local gloo CPU ranks with a hard timeout: the DDP doctor's launcher, and the
test suite's (through :mod:`mmddp_hooks.testing`)."""
from .launch import free_port, run_distributed, run_on_ranks
from .results import DistRunResult, DistTeardownFault, DistTestFailure, RankResult
from .zygotes import close_pools, reuse_ranks

__all__ = ['DistRunResult', 'DistTeardownFault', 'DistTestFailure', 'RankResult', 'close_pools',
           'free_port', 'reuse_ranks', 'run_distributed', 'run_on_ranks']
