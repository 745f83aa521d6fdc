"""Rank functions: train the RapSAM-like example configs through Runner.from_cfg."""
import os
import tempfile
from typing import Dict, List, Optional

import torch.distributed as dist
from mmengine.config import Config
from mmengine.runner import Runner

from mmddp_hooks.model_from_config import unformatted

from scenarios import param_digest


def train_configs(configs: List[str], cfg_options: Optional[dict] = None) -> List[Dict]:
    out = []
    for i, config in enumerate(configs):
        cfg = Config.fromfile(config)
        if cfg_options:
            cfg.merge_from_dict(cfg_options)
        cfg.work_dir = tempfile.mkdtemp(prefix='mmddp_branches_')
        cfg.launcher = 'pytorch'
        cfg.experiment_name = f'branches_{i}_{os.getpid()}'
        cfg.log_level = 'WARNING'
        runner = Runner.from_cfg(unformatted(cfg))  # logged and dumped without yapf
        runner.train()
        hook = next(h for h in runner.hooks if type(h).__name__ == 'DDPAutoTuneHook')
        module = runner.model.module
        out.append(dict(config=os.path.basename(config), plan=hook.plan.to_dict(),
                        frozen=sorted(n for n, p in module.named_parameters()
                                      if not p.requires_grad),
                        digest=param_digest(module), rank=dist.get_rank()))
    return out
