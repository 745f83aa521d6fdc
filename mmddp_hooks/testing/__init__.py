"""Test helpers: a multi-process gloo harness, and config assertions for a project's test suite."""
from .config_asserts import assert_ddp_config_ok, find_configs
from .harness import (
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

__all__ = ['DistRunResult', 'DistTeardownFault', 'DistTestFailure', 'RankResult',
           'assert_ddp_config_ok',
           'close_pools', 'find_configs', 'free_port', 'reuse_ranks', 'run_distributed',
           'run_on_ranks']
