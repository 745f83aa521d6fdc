"""Bad and good distributed setups, each trained for a few iterations through a real Runner."""
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional

import torch
from mmengine.config import Config
from mmengine.dataset import DefaultSampler
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, RandomSampler

from mmddp_hooks.dist import init_dist_if_needed
from mmddp_hooks.model_from_config import unformatted

from scenarios import RandomVectors, param_digest

SANITY_HOOKS = [dict(type='DoubleWrapCheckHook'), dict(type='DataPartitionCheckHook'),
                dict(type='GradLayoutHook')]


class ConvNet(BaseModel):
    """1x1 convs only (``kernel=1``: channels_last differs only in size-1 dims) or 3x3 ones."""

    def __init__(self, kernel: int = 3, channels_last_in_init_weights: bool = False,
                 nested_ddp: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Conv2d(2, 4, kernel, padding=kernel // 2), nn.ReLU(),
                                   nn.Conv2d(4, 4, kernel, padding=kernel // 2))
        self.head = nn.Linear(4, 1)
        if nested_ddp:  # a submodule wrapped by hand inside the model
            self.trunk = DistributedDataParallel(self.trunk)
        self.channels_last = channels_last_in_init_weights

    def init_weights(self) -> None:
        # Runner.train() calls this *after* wrapping the model in DDP: the classic late conversion
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, inputs, target=None, index=None, mode='loss'):
        x = inputs.view(-1, 2, 2, 2)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.head(self.trunk(x).mean((2, 3)))
        return dict(loss=((out - target) ** 2).mean())


def train(model_kw: Optional[dict] = None, *, hooks: Optional[List] = None,
          dataloader: Any = None, prewrap_and_leak: bool = False, iters: int = 4) -> Dict:
    init_dist_if_needed('gloo')
    model = ConvNet(**(model_kw or {}))
    leaked = DistributedDataParallel(model) if prewrap_and_leak else None  # noqa: F841
    if dataloader is None:
        dataloader = dict(dataset=RandomVectors(), batch_size=2, num_workers=0,
                          sampler=dict(type='DefaultSampler', shuffle=True),
                          collate_fn=dict(type='default_collate'))
    runner = Runner(
        model=model, work_dir=tempfile.mkdtemp(prefix='mmddp_sanity_'),
        experiment_name=f'sanity_{os.getpid()}_{id(model)}',
        train_dataloader=dataloader, train_cfg=dict(by_epoch=False, max_iters=iters),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05)),
        cfg=unformatted(Config(dict(model_wrapper_cfg=dict(type='ReconfigurableDDP')))),
        custom_hooks=SANITY_HOOKS if hooks is None else hooks,
        default_hooks=dict(checkpoint=None, logger=dict(type='LoggerHook', interval=1)),
        launcher='pytorch', randomness=dict(seed=0), log_level='INFO')
    runner.train()
    sys.stderr.flush()
    params = {k: v.detach().clone().contiguous() for k, v in runner.model.module.state_dict().items()}
    return dict(digest=param_digest(runner.model.module), params=params)


def sampler_built_before_init() -> Dict:
    """The real mistake: the dataloader (and its sampler) exists before init_process_group."""
    dataset = RandomVectors()
    loader = DataLoader(dataset, batch_size=2, sampler=DefaultSampler(dataset, shuffle=True),
                        collate_fn=lambda b: torch.utils.data.default_collate(b))
    return train(dataloader=loader)


def plain_random_sampler() -> Dict:
    init_dist_if_needed('gloo')
    dataset = RandomVectors()
    loader = DataLoader(dataset, batch_size=2, sampler=RandomSampler(dataset),
                        collate_fn=torch.utils.data.default_collate)
    return train(dataloader=loader)


class SameEveryIndex(RandomVectors):
    """A dataset bug: every index returns the same sample, so sharding cannot help."""

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return super().__getitem__(0)


def same_data_on_every_rank() -> Dict:
    return train(dataloader=dict(dataset=SameEveryIndex(), batch_size=2, num_workers=0,
                                 sampler=dict(type='DefaultSampler', shuffle=True),
                                 collate_fn=dict(type='default_collate')))
