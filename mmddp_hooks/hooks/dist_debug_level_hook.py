"""DistDebugLevelHook: set TORCH_DISTRIBUTED_DEBUG from a config, safely."""
import os

import torch
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from .. import dist as ddist
from ..compat import detail_segfaults_on_gloo

LEVELS = ('OFF', 'INFO', 'DETAIL')


@HOOKS.register_module()
class DistDebugLevelHook(Hook):
    """Set DDP's debug level after the process group exists (``INFO`` names unused parameters).

    ``DETAIL`` is refused on gloo where it segfaults (torch >= 2.13 here); ``INFO`` is enough for
    parameter names in DDP's errors, and :mod:`mmddp_hooks.explain` names them at any level.
    """

    priority = 'VERY_HIGH'

    def __init__(self, level: str = 'INFO') -> None:
        level = level.upper()
        if level not in LEVELS:
            raise ValueError(f'DistDebugLevelHook: level must be one of {LEVELS}, got {level!r}')
        self.level = level

    def before_run(self, runner) -> None:
        if not ddist.is_dist():
            return
        if self.level == 'DETAIL' and dist.get_backend() == 'gloo' and detail_segfaults_on_gloo():
            raise ValueError(f'DistDebugLevelHook: level=DETAIL segfaults when DDP is built on gloo '
                             f'with torch {torch.__version__}; use level=INFO (parameter names in '
                             "DDP's errors) or tools/explain_ddp_error.py")
        dist.set_debug_level(getattr(dist.DebugLevel, self.level))
        os.environ['TORCH_DISTRIBUTED_DEBUG'] = self.level
        runner.logger.info(f'[mmddp_hooks] TORCH_DISTRIBUTED_DEBUG={self.level}')
