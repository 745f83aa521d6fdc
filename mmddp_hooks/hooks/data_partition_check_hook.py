"""DataPartitionCheckHook: every rank must train on its own shard of the data."""
import hashlib
import itertools
from typing import List, Optional

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from .. import dist as ddist

FIX = ("let the Runner build the dataloader after the process group exists (train_dataloader "
       "config with sampler=dict(type='DefaultSampler') or 'InfiniteSampler'), or build your "
       'DistributedSampler after init_process_group / mmddp_hooks.dist.init_dist_if_needed()')


def sampler_world(sampler) -> Optional[tuple]:
    """(world_size, rank) a sampler partitions for, or None for a sampler that does not shard."""
    for ws, rk in (('world_size', 'rank'), ('num_replicas', 'rank')):
        if hasattr(sampler, ws) and hasattr(sampler, rk):
            return int(getattr(sampler, ws)), int(getattr(sampler, rk))
    return None


def _digest(obj) -> str:
    h = hashlib.sha256()

    def feed(x) -> None:
        if isinstance(x, torch.Tensor):
            h.update(x.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                feed(v)
    feed(obj)
    return h.hexdigest()


@HOOKS.register_module()
class DataPartitionCheckHook(Hook):
    """Check the train sampler before training and the first batch across ranks.

    Errors: a sampler that does not shard (plain ``RandomSampler``) in a distributed run, a sampler
    built before the process group existed (it partitions for world size 1), and identical first
    batches on every rank. Uneven shard sizes are reported, not failed.

    Args:
        strict: raise on errors (default); False logs them as warnings.
        sample_indices: also compare the first ``sample_indices`` indices of every rank's sampler
            (cheap; they must be disjoint).
    """

    priority = 'HIGH'

    def __init__(self, strict: bool = True, sample_indices: int = 16) -> None:
        self.strict = strict
        self.sample_indices = sample_indices
        self._checked_batch = False

    def _fail(self, runner, msg: str) -> None:
        if self.strict:
            raise RuntimeError(f'[mmddp_hooks] {msg}')
        runner.logger.warning(f'[mmddp_hooks] {msg}')

    def before_train(self, runner) -> None:
        if not ddist.is_dist() or ddist.get_world_size() == 1:
            return
        loader = runner.train_dataloader
        sampler = getattr(loader, 'sampler', None)
        batch_sampler = getattr(loader, 'batch_sampler', None)
        sampler = getattr(batch_sampler, 'sampler', sampler) if sampler is None else sampler
        world, rank = ddist.get_world_size(), ddist.get_rank()
        part = sampler_world(sampler)
        name = type(sampler).__name__
        if part is None:
            self._fail(runner, f'the train sampler {name} does not shard the data: every one of '
                               f'the {world} ranks trains on the same samples. Fix: {FIX}.')
            return
        if part != (world, rank):
            self._fail(runner, f'the train sampler {name} partitions for world_size={part[0]}, '
                               f'rank={part[1]}, but this process is rank {rank} of {world}: it '
                               f'was built before the process group existed. Fix: {FIX}.')
            return
        self._check_indices(runner, sampler)

    def _check_indices(self, runner, sampler) -> None:
        mine: List[int] = [int(i) for i in itertools.islice(iter(sampler), self.sample_indices)]
        length = len(sampler) if hasattr(sampler, '__len__') else -1
        everyone = ddist.all_gather_object((mine, length))  # samplers shard over the default group
        seen = {}
        for r, (indices, _) in enumerate(everyone):
            for i in indices:
                if i in seen and seen[i] != r:
                    self._fail(runner, f'ranks {seen[i]} and {r} both draw sample {i} among their '
                                       f'first {self.sample_indices}: the shards overlap. Fix: {FIX}.')
                    return
                seen[i] = r
        lengths = sorted({n for _, n in everyone})
        if len(lengths) > 1:
            runner.logger.info(f'[mmddp_hooks] uneven shards: ranks hold {lengths} samples '
                               '(reported, not an error)')

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self._checked_batch or not ddist.is_dist() or ddist.get_world_size() == 1:
            return
        self._checked_batch = True
        everyone = ddist.all_gather_object(_digest(data_batch))
        if len(set(everyone)) == 1:
            self._fail(runner, f'the first batch is identical on all {len(everyone)} ranks: '
                               f'every rank trains on the same data. Fix: {FIX}.')
