"""Test helpers: a multi-process gloo harness for distributed unit tests."""
from .harness import DistRunResult, DistTestFailure, RankResult, free_port, run_distributed, run_on_ranks

__all__ = ['DistRunResult', 'DistTestFailure', 'RankResult', 'free_port', 'run_distributed',
           'run_on_ranks']
