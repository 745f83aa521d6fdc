"""Record, per optimizer step and rank, which reducer parameters received a gradient.

The probe is the guard of an empty plan (``find_unused_parameters=False``, nothing ignored or filled)
that also keeps what it saw: each probe step trains exactly as ``find_unused_parameters=True`` would
(see :mod:`mmddp_hooks.guard`), while DDP itself runs as ``False`` does. ``True`` is not needed and
sometimes cannot run: with reentrant activation checkpointing (``torch.utils.checkpoint``'s default,
OpenMMLab's ``with_cp=True``) it raises "marked as ready twice". The probe notices such checkpoints
in the loss's autograd graph, so the plan never switches to ``True`` there.
"""
import hashlib
from typing import List, Optional

import numpy as np
import torch
from torch import nn
from torch.distributed import ProcessGroup

from . import dist as ddist
from .guard import PlanGuard
from .report import Usage
from .trainable import TrainableSet

REENTRANT_NODE = 'CheckpointFunctionBackward'


def uses_reentrant_checkpoint(loss: torch.Tensor) -> bool:
    """Whether the loss's autograd graph holds a reentrant ``torch.utils.checkpoint`` region."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == REENTRANT_NODE:
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


class UsageProbe(PlanGuard):
    """The guard of the empty plan, keeping each step's local usage for the report."""

    recording = True

    def __init__(self, module: nn.Module, group: Optional[ProcessGroup] = None,
                 trainable: Optional[TrainableSet] = None) -> None:
        super().__init__(module, fill=[], ignore=[], group=group, trainable=trainable)
        self.explain = False  # unused parameters are what the probe is there to find
        self.steps: List[np.ndarray] = []
        self.reentrant_checkpoint = False

    def record(self, used: np.ndarray) -> None:
        self.steps.append(used)

    def before_backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """The guard's, and a look for reentrant checkpointing in this step's graph."""
        if not self.reentrant_checkpoint and loss.grad_fn is not None:
            self.reentrant_checkpoint = uses_reentrant_checkpoint(loss)
        super().before_backward(loss, sync)

    def local_usage(self) -> np.ndarray:
        """Shape (iterations, params) for this rank."""
        return np.stack(self.steps) if self.steps else np.zeros((0, len(self.params)), bool)

    def gather(self) -> Usage:
        """Combine every rank's record into one :class:`Usage` (control plane, every rank).

        A one-off exchange when the probe ends: each rank sends a digest of its parameter names
        and its usage as bits (``iterations x parameters / 8`` bytes), so every rank receives
        ``O(N)`` bytes once, far less than the parameters DDP's constructor broadcasts.
        """
        names = [rp.name for rp in self.params]
        digest = hashlib.sha1('\0'.join(names).encode()).hexdigest()
        local = self.local_usage()
        gathered = ddist.all_gather_object(
            (digest, len(names), local.shape[0], np.packbits(local, axis=None),
             self.reentrant_checkpoint), self.group)
        for rank, (rank_digest, n, _, _, _) in enumerate(gathered):
            if rank_digest != digest:
                raise RuntimeError(
                    f'rank {rank} has a different reducer parameter list than rank '
                    f'{ddist.group_rank(self.group)} ({n} vs {len(names)} parameters): the model '
                    'must be built identically on every rank')
        steps = {g[2] for g in gathered}
        if len(steps) != 1:
            raise RuntimeError(f'ranks probed different numbers of iterations: {sorted(steps)}')
        used = [np.unpackbits(bits, count=local.size).astype(bool).reshape(local.shape)
                for _, _, _, bits, _ in gathered]
        return Usage(names=names, numels=[rp.numel for rp in self.params], used=np.stack(used),
                     reentrant_checkpoint=any(g[4] for g in gathered))
