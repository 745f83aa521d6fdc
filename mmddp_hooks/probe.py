"""Record, per training step and rank, which reducer parameters received a gradient.

A post-accumulate-grad hook on each reducer parameter fires exactly when autograd accumulates a
gradient into it: the same event that DDP's reducer counts as "used". The hooks exist only during
the probe iterations and are removed afterwards, so they cost nothing later.
"""
from typing import List, Optional

import numpy as np
import torch
from torch.distributed import ProcessGroup

from . import dist as ddist
from .reducer_params import ReducerParam
from .report import Usage


class UsageProbe:
    """Marks reducer parameters as used when a gradient is accumulated into them."""

    def __init__(self, params: List[ReducerParam]) -> None:
        self.params = params
        self._current = np.zeros(len(params), dtype=bool)
        self.steps: List[np.ndarray] = []
        self._handles = [rp.param.register_post_accumulate_grad_hook(self._marker(i))
                         for i, rp in enumerate(params)]

    def _marker(self, i: int):
        def mark(_: torch.Tensor) -> None:
            self._current[i] = True
        return mark

    def end_step(self) -> None:
        """Close one training step (one or more backwards) and start the next."""
        self.steps.append(self._current.copy())
        self._current[:] = False

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def local_usage(self) -> np.ndarray:
        """Shape (iterations, params) for this rank."""
        return np.stack(self.steps) if self.steps else np.zeros((0, len(self.params)), bool)

    def gather(self, group: Optional[ProcessGroup] = None) -> Usage:
        """Combine every rank's record into one :class:`Usage` (control plane, all ranks of ``group``)."""
        local = self.local_usage()
        names = [rp.name for rp in self.params]
        gathered = ddist.all_gather_object((names, local), group)
        for rank, (rank_names, _) in enumerate(gathered):
            if rank_names != names:
                raise RuntimeError(
                    f'rank {rank} has a different reducer parameter list than rank '
                    f'{ddist.group_rank(group)} ({len(rank_names)} vs {len(names)} parameters): '
                    'the model must be built identically on every rank')
        steps = {g[1].shape[0] for g in gathered}
        if len(steps) != 1:
            raise RuntimeError(f'ranks probed different numbers of iterations: {sorted(steps)}')
        return Usage(names=names, numels=[rp.numel for rp in self.params],
                     used=np.stack([g[1] for g in gathered]))
