"""A hook for the launcher tests: each rank writes who it is and what the run did on it.

``work_dir/ranks/rank{R}.json``: global rank, world size, local rank, node (slurm's SLURM_NODEID,
torchrun's GROUP_RANK), the plan the wrapper applied, whether its guard was armed, every rank's rank
as seen over the gloo control plane, and a digest of the parameters.
"""
import hashlib
import json
import os
import os.path as osp

import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from mmddp_hooks import dist as ddist


@HOOKS.register_module()
class RankRecordHook(Hook):
    priority = 'LOWEST'

    def after_train(self, runner) -> None:
        wrapper = runner.model
        digest = hashlib.sha256()
        for name, p in sorted(wrapper.module.named_parameters()):
            digest.update(name.encode())
            digest.update(p.detach().cpu().numpy().tobytes())
        record = dict(rank=dist.get_rank(), world_size=dist.get_world_size(),
                      local_rank=int(os.environ['LOCAL_RANK']),
                      node=int(os.environ.get('SLURM_NODEID', os.environ.get('GROUP_RANK', -1))),
                      plan=wrapper.plan.to_dict() if wrapper.plan is not None else None,
                      guarded=wrapper.guard is not None,
                      control_plane=ddist.all_gather_object(dist.get_rank()),
                      digest=digest.hexdigest())
        os.makedirs(osp.join(runner.work_dir, 'ranks'), exist_ok=True)
        with open(osp.join(runner.work_dir, 'ranks', f'rank{record["rank"]}.json'), 'w') as f:
            json.dump(record, f)
