"""In-batch InfoNCE whose negatives are the *global* batch: N ranks x batch b == 1 process x N*b.

With per-rank negatives, 8 GPUs x batch 3 gives each query 2 negatives instead of 23, and the model
barely learns. Here each rank scores its own rows against every rank's keys (memory O(b * N*b)),
labels are offset by the rows of lower ranks, and the gather's backward sums over ranks. The local loss
is scaled by N / (global row count), so that after DDP averages gradients over N ranks they equal the
gradients of the single-process mean over the concatenated batch, for uneven batches too.

Per step it exchanges every rank's row count once, as host ints over the control plane (none with
``equal_batches=True``), and never reads a device tensor on the host: no ``.item()``, no boolean-mask
indexing, so CUDA steps run without a host sync.
"""
import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import nn

from . import dist as ddist

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NEGATIVES = ('global', 'local', 'explicit')
IGNORE = -100  # cross_entropy's ignore_index: masked rows add nothing, without indexing by a mask


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
        equal_batches: every rank always passes the same number of rows (a ``drop_last`` sampler):
            the per-step row-count exchange is skipped.
    """

    def __init__(self, temperature: float = 0.07, learnable_temperature: bool = False,
                 symmetric: bool = False, negatives: str = 'global',
                 score_fn: Optional[ScoreFn] = None, loss_weight: float = 1.0,
                 log_key: str = 'infonce_global', equal_batches: bool = False) -> None:
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
        self.equal_batches = equal_batches

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
            valid = None if mask is None else mask.bool()
            if self.negatives == 'explicit':
                candidates = torch.cat([key.unsqueeze(1), _upcast(negatives)], dim=1)
                logits = self.score_fn(query, candidates) * scale
                labels = _masked(logits.new_zeros(len(logits), dtype=torch.long), valid)
                loss_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction='sum')
            else:
                sizes = self._sizes(query.shape[0])
                loss_sum = self._in_batch(query, key, valid, scale, sizes)
                if self.symmetric:
                    loss_sum = (loss_sum + self._in_batch(key, query, valid, scale, sizes)) / 2
        count = (loss_sum.new_full((), float(query.shape[0])) if valid is None
                 else valid.sum().to(loss_sum.dtype))
        local = self.negatives == 'local'
        # one data-plane all-reduce gives the global row count and the global loss sum
        totals = torch.stack([count, loss_sum.detach()])
        totals = totals if local else ddist.all_reduce_(totals)
        world = 1 if local else ddist.get_world_size()
        loss = loss_sum * (world / totals[0].clamp(min=1))
        global_value = totals[1] / totals[0].clamp(min=1)
        return {'loss_infonce': loss * self.loss_weight, self.log_key: global_value}

    def _sizes(self, n_rows: int) -> List[int]:
        """Every rank's row count: one control-plane exchange of host ints, or none."""
        if self.negatives == 'local' or not ddist.is_dist():
            return [n_rows]
        if self.equal_batches:
            return [n_rows] * ddist.get_world_size()
        return ddist.row_counts(n_rows)

    def _in_batch(self, rows: torch.Tensor, cols: torch.Tensor, valid: Optional[torch.Tensor],
                  scale: torch.Tensor, sizes: List[int]) -> torch.Tensor:
        """Sum over this rank's valid rows of CE(row vs every column); positives on the diagonal."""
        if self.negatives == 'global' and len(sizes) > 1:
            keys = ddist.gather_with_grad(cols, sizes)
            key_valid = None if valid is None else ddist.gather_rows(valid.to(torch.uint8),
                                                                     sizes).bool()
            offset = sum(sizes[:ddist.get_rank()])
        else:
            keys, key_valid, offset = cols, valid, 0
        logits = self.score_fn(rows, keys) * scale
        if key_valid is not None:
            logits = logits.masked_fill(~key_valid[None, :], float('-inf'))
        labels = _masked(torch.arange(rows.shape[0], device=rows.device) + offset, valid)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction='sum')


def _masked(labels: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    return labels if valid is None else labels.masked_fill(~valid, IGNORE)
