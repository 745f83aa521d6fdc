"""Two-tower models and rank functions comparing N ranks x b with 1 process x N*b."""
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import mmddp_hooks.contrastive as contrastive
from mmddp_hooks.contrastive import GlobalInBatchInfoNCE

D_IN, D_EMB = 6, 5


def energy_scores(context: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """An energy model's score: -||c - a||^2, pairwise (b, K) or per-sample (b, M)."""
    if actions.dim() == 2:
        return -((context[:, None, :] - actions[None, :, :]) ** 2).sum(-1)
    return -((context[:, None, :] - actions) ** 2).sum(-1)


class TwoTower(nn.Module):
    def __init__(self, symmetric=False, score=None, negatives='global', dtype=torch.float64,
                 equal_batches=False):
        super().__init__()
        torch.manual_seed(0)
        self.query_tower = nn.Linear(D_IN, D_EMB)
        self.key_tower = nn.Linear(D_IN, D_EMB)
        self.criterion = GlobalInBatchInfoNCE(temperature=0.2, learnable_temperature=True,
                                              symmetric=symmetric, negatives=negatives,
                                              score_fn=energy_scores if score == 'energy' else None,
                                              equal_batches=equal_batches)
        self.to(dtype)

    def forward(self, xq, xk, negatives=None, mask=None):
        neg = self.key_tower(negatives) if negatives is not None else None
        return self.criterion(self.query_tower(xq), self.key_tower(xk), negatives=neg, mask=mask)


def global_batch(total: int, dtype, seed: int = 7, n_neg: int = 4):
    mixing = torch.randn(D_IN, D_IN, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)  # the fixed relation between the two views
    g = torch.Generator().manual_seed(seed)
    xq = torch.randn(total, D_IN, generator=g, dtype=torch.float64)
    xk = xq @ mixing + 0.3 * torch.randn(total, D_IN, generator=g, dtype=torch.float64)
    neg = torch.randn(total, n_neg, D_IN, generator=g, dtype=torch.float64)
    mask = torch.rand(total, generator=g) > 0.25
    return xq.to(dtype), xk.to(dtype), neg.to(dtype), mask


def _rows(sizes: List[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def grads_of(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def step(sizes: List[int], dtype=torch.float64, symmetric=False, score=None,
         negatives='global', masked=False, equal_batches=False) -> Dict:
    """One forward/backward: under DDP on this rank's rows, or single-process on all rows."""
    model = TwoTower(symmetric, score, negatives, dtype, equal_batches)
    xq, xk, neg, mask = global_batch(sum(sizes), dtype)
    if dist.is_initialized():
        rows = _rows(sizes, dist.get_rank())
        model_call = DistributedDataParallel(model)
    else:
        rows, model_call = slice(None), model
    out = model_call(xq[rows], xk[rows], negatives=neg[rows] if negatives == 'explicit' else None,
                     mask=mask[rows] if masked else None)
    out['loss_infonce'].backward()
    return dict(loss=out['infonce_global'].item(), grads=grads_of(model))


class _NaiveGather(torch.autograd.Function):
    """The widely copied GatherLayer: backward returns this rank's slice, not the sum."""

    @staticmethod
    def forward(ctx, x, sizes=None, group=None):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        ctx.n = x.shape[0]
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        r = dist.get_rank()
        return grad[r * ctx.n:(r + 1) * ctx.n], None, None


def count_row_exchanges(sizes: List[int], equal_batches: bool) -> Dict:
    """One symmetric, masked step, counting the row-count exchanges it makes."""
    calls = []
    exchange = contrastive.ddist.row_counts
    contrastive.ddist.row_counts = lambda n, group=None: calls.append(n) or exchange(n, group)
    try:  # restored: a rank may run other steps afterwards
        out = step(sizes, symmetric=True, masked=True, equal_batches=equal_batches)
    finally:
        contrastive.ddist.row_counts = exchange
    return dict(out, exchanges=len(calls))


def step_with_naive_gather(sizes: List[int]) -> Dict:
    original = contrastive.ddist.gather_with_grad
    contrastive.ddist.gather_with_grad = _NaiveGather.apply
    try:
        return step(sizes)
    finally:
        contrastive.ddist.gather_with_grad = original


def train(sizes: List[int], negatives: str = 'global', steps: int = 100,
          eval_rows: int = 64) -> Dict[str, float]:
    """Adam on a fixed stream of batches; returns the global InfoNCE of held-out pairs after it."""
    model = TwoTower(negatives=negatives)
    wrapped = DistributedDataParallel(model) if dist.is_initialized() else model
    rows = _rows(sizes, dist.get_rank()) if dist.is_initialized() else slice(None)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for i in range(steps):
        xq, xk, _, _ = global_batch(sum(sizes), torch.float64, seed=100 + i)
        opt.zero_grad()
        wrapped(xq[rows], xk[rows])['loss_infonce'].backward()
        opt.step()
    return dict(eval_loss=held_out_loss(model, eval_rows))


def held_out_loss(model: TwoTower, rows: int, seed: int = 999) -> float:
    xq, xk, _, _ = global_batch(rows, torch.float64, seed=seed)
    crit = GlobalInBatchInfoNCE(temperature=0.5)
    crit.log_inv_temperature = model.criterion.log_inv_temperature.detach()
    with torch.no_grad():
        q, k = model.query_tower(xq), model.key_tower(xk)
        logits = contrastive.cosine_scores(q, k) * crit.log_inv_temperature.exp()
        return torch.nn.functional.cross_entropy(logits, torch.arange(rows)).item()


def reference(fn_name: str, *args, **kwargs) -> Optional[Dict]:
    """Run a case function single-process (no process group) in the test process."""
    assert not dist.is_initialized()
    return globals()[fn_name](*args, **kwargs)


def train_example_config(config: str, work_dir: str) -> Dict:
    """The example config through Runner.from_cfg; the logged global InfoNCE, first and last."""
    from mmengine.config import Config
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    from mmddp_hooks.model_from_config import unformatted

    class Recorder(Hook):
        def __init__(self):
            self.values: List[float] = []

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            self.values.append(float(outputs['infonce_global']))

    cfg = Config.fromfile(config)
    cfg.work_dir = work_dir
    cfg.experiment_name = f'two_tower_{dist.get_rank()}'
    runner = Runner.from_cfg(unformatted(cfg))  # logged and dumped without yapf
    recorder = Recorder()
    runner.register_hook(recorder)
    runner.train()
    return dict(values=recorder.values, plan=runner.model.plan.summary(),
                temperature=float(runner.model.module.criterion.log_inv_temperature))
