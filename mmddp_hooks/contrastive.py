"""In-batch InfoNCE whose negatives are the *global* batch: N ranks x batch b == 1 process x N*b.

With per-rank negatives, 8 GPUs x batch 3 gives each query 2 negatives instead of 23, and the model
barely learns. Here each rank scores its own rows against every rank's keys (memory O(b * N*b)),
labels are offset by the rows of lower ranks, and the gather's backward sums over ranks. The local loss
is scaled by N / (global row count), so that after DDP averages gradients over N ranks they equal the
gradients of the single-process mean over the concatenated batch, for uneven batches too.
"""
import math
from typing import Callable, Dict, Optional

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import nn

from .dist import all_reduce_sum, gather_with_grad, get_world_size, is_dist

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NEGATIVES = ('global', 'local', 'explicit')


def _row_offset(n_rows: int, device: torch.device) -> int:
    """Rows held by lower ranks: where this rank's positives sit in the gathered keys."""
    if not is_dist():
        return 0
    size = torch.tensor([n_rows], device=device)
    sizes = [torch.zeros_like(size) for _ in range(tdist.get_world_size())]
    tdist.all_gather(sizes, size)
    return int(sum(s.item() for s in sizes[:tdist.get_rank()]))


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32: half-precision softmax over a large batch loses the tail."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def cosine_scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(b, D) x (K, D) -> (b, K), or (b, D) x (b, M, D) -> (b, M) for explicit candidates."""
    q = F.normalize(query, dim=-1)
    k = F.normalize(keys, dim=-1)
    return q @ k.t() if k.dim() == 2 else torch.einsum('bd,bmd->bm', q, k)


@MODELS.register_module()
class GlobalInBatchInfoNCE(nn.Module):
    """InfoNCE over the global batch, exact under DDP gradient averaging.

    Args:
        temperature: initial (or fixed) softmax temperature.
        learnable_temperature: learn ``log(1/temperature)`` (CLIP's logit scale). It is a parameter
            of this module, so it lives in the model and DDP averages its gradient.
        symmetric: average query->key and key->query losses (CLIP).
        negatives: 'global' (every rank's keys), 'local' (this rank's keys only: the weak baseline),
            or 'explicit' (per-sample negatives passed to ``forward``; no gather needed).
        score_fn: ``(query (b, ...), keys (K, ...)) -> (b, K)`` pairwise scores, e.g. an energy
            model's ``-E(context, action)``; for 'explicit', ``(b, ...), (b, M, ...) -> (b, M)``.
            Defaults to cosine similarity.
        loss_weight: multiplies the loss.
        log_key: key of the all-reduced global loss value in the returned dict (no 'loss' in it,
            so MMEngine's ``parse_losses`` logs it without adding it to the loss).
    """

    def __init__(self, temperature: float = 0.07, learnable_temperature: bool = False,
                 symmetric: bool = False, negatives: str = 'global',
                 score_fn: Optional[ScoreFn] = None, loss_weight: float = 1.0,
                 log_key: str = 'infonce_global') -> None:
        super().__init__()
        if negatives not in NEGATIVES:
            raise ValueError(f'negatives must be one of {NEGATIVES}, got {negatives!r}')
        if temperature <= 0:
            raise ValueError(f'temperature must be > 0, got {temperature}')
        if 'loss' in log_key:
            raise ValueError(f"log_key {log_key!r} contains 'loss': MMEngine would add it to the "
                             'loss a second time')
        if symmetric and negatives == 'explicit':
            raise ValueError('symmetric=True needs in-batch negatives, not explicit ones')
        init = torch.tensor(math.log(1.0 / temperature))
        if learnable_temperature:
            self.log_inv_temperature = nn.Parameter(init)
        else:
            self.register_buffer('log_inv_temperature', init)
        self.symmetric = symmetric
        self.negatives = negatives
        self.score_fn = score_fn or cosine_scores
        self.loss_weight = loss_weight
        self.log_key = log_key

    def forward(self, query: torch.Tensor, key: torch.Tensor,
                negatives: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Loss for this rank's rows.

        Args:
            query, key: (b, ...) rows; row i of ``key`` is the positive of row i of ``query``.
            negatives: (b, M, ...) per-sample negatives, for ``negatives='explicit'``.
            mask: (b,) bool, False for padding rows (neither queries nor keys).
        """
        if self.negatives == 'explicit' and negatives is None:
            raise ValueError("negatives='explicit' needs the negatives tensor")
        with torch.autocast(device_type=query.device.type, enabled=False):
            query, key = _upcast(query), _upcast(key)
            scale = self.log_inv_temperature.exp()
            valid = (torch.ones(query.shape[0], dtype=torch.bool, device=query.device)
                     if mask is None else mask.bool())
            if self.negatives == 'explicit':
                candidates = torch.cat([key.unsqueeze(1), _upcast(negatives)], dim=1)
                logits = self.score_fn(query, candidates) * scale
                ce = F.cross_entropy(logits, logits.new_zeros(len(logits), dtype=torch.long),
                                     reduction='none')
                loss_sum = ce[valid].sum()
            else:
                loss_sum = self._in_batch(query, key, valid, scale)
                if self.symmetric:
                    loss_sum = (loss_sum + self._in_batch(key, query, valid, scale)) / 2
        count = valid.sum().to(loss_sum.dtype)
        total = all_reduce_sum(count) if self.negatives != 'local' else count
        world = get_world_size() if self.negatives != 'local' else 1
        loss = loss_sum * (world / total.clamp(min=1))
        global_value = all_reduce_sum(loss_sum.detach()) / all_reduce_sum(count).clamp(min=1)
        return {'loss_infonce': loss * self.loss_weight, self.log_key: global_value}

    def _in_batch(self, rows: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor,
                  scale: torch.Tensor) -> torch.Tensor:
        """Sum over this rank's valid rows of CE(row vs every column); positives on the diagonal."""
        if self.negatives == 'global':
            keys = gather_with_grad(cols)
            key_valid = gather_with_grad(valid.to(cols.dtype)).bool()
            offset = _row_offset(rows.shape[0], rows.device)
        else:
            keys, key_valid, offset = cols, valid, 0
        logits = self.score_fn(rows, keys) * scale
        logits = logits.masked_fill(~key_valid[None, :], float('-inf'))
        labels = torch.arange(rows.shape[0], device=rows.device) + offset
        ce = F.cross_entropy(logits[valid], labels[valid], reduction='sum')
        return ce
