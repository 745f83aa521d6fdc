"""ReplicaConsistencyHook: prove that DDP replicas hold bit-identical parameters."""
import hashlib
from typing import Dict

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch.distributed import ReduceOp

from .. import dist as ddist
from ..text import names


def parameter_digests(module) -> Dict[str, str]:
    out = {}
    for name, p in module.named_parameters():
        out[name] = hashlib.sha256(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return out


def _as_ints(digests: Dict[str, str]) -> torch.Tensor:
    """Each digest's first 63 bits as an int64, then their negatives: one reduction with MAX gives
    every parameter's largest and smallest value over the ranks, equal where all agree."""
    values = torch.tensor([int(d[:16], 16) >> 1 for d in digests.values()], dtype=torch.int64)
    return torch.cat([values, -values])


@HOOKS.register_module()
class ReplicaConsistencyHook(Hook):
    """Compare every parameter across ranks after training (and every ``interval`` iterations).

    Divergent replicas are silent in DDP: a parameter DDP ignores, or a gradient reduced on some
    ranks only, trains on happily. This hook raises naming the first parameters that differ and
    logs a digest when all ranks agree. The ranks compare 63 bits of each parameter's sha256 by
    one reduction over the control tree (16 bytes per parameter and rank, at any number of
    ranks). Buffers are not compared: with ``broadcast_buffers=False``
    (MMEngine's default) BatchNorm statistics legitimately differ per rank.

    Args:
        interval: also check every ``interval`` training iterations (0: only after training).
    """

    priority = 'LOWEST'

    def __init__(self, interval: int = 0) -> None:
        if interval < 0:
            raise ValueError(f'ReplicaConsistencyHook: interval must be >= 0, got {interval}')
        self.interval = interval

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.interval and self.every_n_train_iters(runner, self.interval):
            self.check(runner)

    def after_train(self, runner) -> None:
        self.check(runner)

    def check(self, runner) -> None:
        if not ddist.is_dist():
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        mine = parameter_digests(model)
        # replicas are those of the DDP wrapper's group; the same bytes per rank at any size
        group = getattr(runner.model, 'process_group', None)
        counts = ddist.all_reduce_flags(torch.tensor([len(mine), -len(mine)]), group, ReduceOp.MAX)
        if counts[0] != -counts[1]:
            raise RuntimeError(
                f'DDP replicas differ at iteration {runner.iter}: the ranks hold between '
                f'{-int(counts[1])} and {int(counts[0])} parameters (this rank {len(mine)}): the '
                'model must be built identically on every rank')
        spread = ddist.all_reduce_flags(_as_ints(mine), group, op=ReduceOp.MAX)
        count = len(mine)
        differing = [name for name, hi, lo in zip(mine, spread[:count].tolist(),
                                                  spread[count:].tolist()) if hi != -lo]
        if differing:
            raise RuntimeError(
                f'DDP replicas diverged at iteration {runner.iter}: {len(differing)} parameters '
                f'differ across ranks, e.g. {names(differing, 5, "")}')
        total = hashlib.sha256(''.join(mine[n] for n in sorted(mine)).encode()).hexdigest()
        runner.logger.info(f'[mmddp_hooks] replicas bit-identical on {ddist.group_size(group)} '
                           f'ranks at iteration {runner.iter}: {count} parameters, sha256 '
                           f'{total[:16]}')
