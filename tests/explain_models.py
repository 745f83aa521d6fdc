"""A model whose DDP error exercises every naming rule, and the rank function that triggers it."""
import json
import os
import sys

import torch
import torch.distributed as dist
from mmengine.model import BaseModel
from mmengine.registry import MODELS
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@MODELS.register_module()
class ExplainNet(BaseModel):
    """Root-level, tied, frozen, DDP-ignored parameters; rank r skips branch r."""

    def __init__(self, many_unused: int = 0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.unused_root = nn.Parameter(torch.ones(2))
        self.enc = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight
        self.branches = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.ignored_head = nn.Linear(4, 4)
        self._ddp_params_and_buffers_to_ignore = ['ignored_head.weight', 'ignored_head.bias']
        self.many = nn.ParameterList(nn.Parameter(torch.zeros(1)) for _ in range(many_unused))

    def forward(self, inputs, data_samples=None, mode='loss'):
        h = self.dec(self.frozen(self.enc(inputs))) * self.scale
        rank = dist.get_rank() if dist.is_initialized() else 0
        for i, branch in enumerate(self.branches):
            if i != rank:
                h = h + branch(h)
        return dict(loss=h.square().mean())


def trigger(config: str, out_dir: str, via_wrapper: bool = False) -> None:
    """Train until DDP raises; write the message and the truth (index -> name) for this rank."""
    from mmddp_hooks.model_from_config import build_model, load_config
    from mmddp_hooks.wrapper import ReconfigurableDDP

    model = build_model(load_config(config))
    ddp = ReconfigurableDDP(model) if via_wrapper else DistributedDataParallel(model)
    first_alias = {id(p): n for n, p in model.named_parameters()}
    reducer_list = ddp._build_params_for_reducer()[0]  # DDP's own list: the truth
    x = torch.randn(2, 4)
    truth = None
    try:
        for _ in range(2):
            loss = ddp._run_forward(dict(inputs=x), 'loss')['loss'] if via_wrapper else \
                ddp(x)['loss']
            loss.backward()
            if truth is None:
                truth = [[i, first_alias[id(p)]] for i, p in enumerate(reducer_list)
                         if p.grad is None]
    except RuntimeError as e:
        with open(os.path.join(out_dir, f'rank{dist.get_rank()}.json'), 'w') as f:
            json.dump({'text': str(e), 'type': type(e).__name__, 'truth': truth}, f)
        print(f'RuntimeError: {e}', file=sys.stderr, flush=True)
        raise
