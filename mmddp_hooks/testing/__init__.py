"""Helpers for a project's own test suite: config assertions, and the N-rank launcher
(:mod:`mmddp_hooks.ranks`) for testing distributed code."""
from ..ranks import (
                     DistRunResult,
                     DistTeardownFault,
                     DistTestFailure,
                     RankResult,
                     close_pools,
                     free_port,
                     reuse_ranks,
                     run_distributed,
                     run_on_ranks,
)
from .config_asserts import assert_ddp_config_ok, find_configs

__all__ = ['DistRunResult', 'DistTeardownFault', 'DistTestFailure', 'RankResult',
           'assert_ddp_config_ok',
           'close_pools', 'find_configs', 'free_port', 'reuse_ranks', 'run_distributed',
           'run_on_ranks']
