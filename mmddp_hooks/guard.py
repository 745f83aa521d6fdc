"""Make every ``find_unused_parameters=False`` step train exactly as ``find_unused_parameters=True``.

A plan keeps DDP on ``False`` because the probe saw a fixed usage: parameters never used (DDP-ignored)
and parameters unused on some ranks (zero-filled there). Usage can change later: a warm-up branch
wakes up, another switches off. The guard decides such changes by gradients, never by calls (a stage
that runs but whose output is dropped, or a head called in a no-grad val loop, changes nothing), and
fixes the step in which they happen, before the optimizer sees it. After each synchronising backward:

1. zero-fill what the plan expects to be unused on this rank; if the reducer still did not finalise,
   zero-fill every reducer parameter whose gradient did not arrive (the *rescue*): the missing
   buckets complete, and each slot holds what ``True`` would have put there, zero for a locally
   unused parameter;
2. all-reduce, on the gloo control plane, one int per watched parameter (did it get a gradient on this
   rank in this step?, read from ``.grad``, or from a hook for this backward where ``.grad`` was
   already set before it) and the number of rescued parameters: a few hundred CPU
   ints, started asynchronously at the end of backward, nothing read from a GPU. With those reads,
   that is the guard's per-step cost;
3. where no rank used a parameter, set its gradient back to ``None``, as ``True`` leaves it (a zero
   would still move it through momentum and weight decay); where an ignored parameter got a gradient
   on any rank, average it by hand on the DDP group (``g / world_size``, summed, as DDP's reducer
   does), so a branch that wakes up trains from its first step.

Every rank sees the same sums, so all of them agree, at the same step, that usage changed and on the
switch to a safer plan.

The same exchange carries, in the same int per parameter, whether its ``requires_grad`` differs from
when DDP was built (:mod:`mmddp_hooks.trainable`): a freeze or unfreeze is then fixed in the step
where it shows (a newly trainable parameter averaged by hand, a newly frozen one back to ``None``)
and is not a usage change; a change on some ranks only stops training in that step, on every rank,
with the names.
"""
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.autograd import Variable
from torch.distributed import ProcessGroup

from . import dist as ddist
from .explain import explain_unused_error
from .reducer_params import ReducerParam, reducer_params
from .trainable import TrainableChange, TrainableSet, rank_dependent_message


def zero_fill(params: List[torch.Tensor]) -> None:
    """Run each parameter's AccumulateGrad with zeros, firing DDP's reducer hook for it.

    A parameter frozen since DDP was built is still in its reducer: it requires grad for the fill
    only (DDP's hook sits on its gradient accumulator, which outlives the flag).
    """
    if not params:
        return
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        torch.autograd.backward(params, [torch.zeros_like(p) for p in params])
    finally:
        for p in frozen:
            p.requires_grad_(False)


def reducer_finalized(reducer) -> bool:
    try:
        reducer._check_reducer_finalized()
    except RuntimeError:
        return False
    return True


class PlanGuard:
    """Per-rank state of the guard for one applied plan.

    Args:
        module: the module DDP wraps, already rebuilt with the plan's ignore set.
        fill: parameters the plan zero-fills on this rank.
        ignore: parameters the plan DDP-ignored.
        group: the DDP wrapper's process group (``None``: the default group).
        trainable: what DDP was built from (default: the module's flags now).
    """

    def __init__(self, module: nn.Module, fill: List[str], ignore: List[str],
                 group: Optional[ProcessGroup] = None,
                 trainable: Optional[TrainableSet] = None) -> None:
        trainable = self.trainable = trainable or TrainableSet(module)
        built = dict(zip(map(id, trainable.params), trainable.built))
        named = dict(module.named_parameters())
        self.params: List[ReducerParam] = reducer_params(module)
        self.ignore_names = list(ignore)
        self.ignored = [named[n] for n in ignore]
        # watched: the reducer's parameters, the ignored ones, then every other (frozen) one
        seen = {id(p) for p in [rp.param for rp in self.params] + self.ignored}
        off = [(n, p) for n, p in zip(trainable.names, trainable.params) if id(p) not in seen]
        self._watched = [rp.param for rp in self.params] + self.ignored + [p for _, p in off]
        self.names = [rp.name for rp in self.params] + self.ignore_names + [n for n, _ in off]
        self._built = np.array([built[id(p)] for p in self._watched], dtype=bool)
        self.trainable_change: Optional[TrainableChange] = None  # set by the step it shows in
        fill_names = set(fill)
        self._fill = np.array([rp.name in fill_names for rp in self.params], dtype=bool)
        # which watched parameters got a gradient in this backward, recorded by hooks only where
        # .grad was already set before it (None: every .grad started as None)
        self._arrived: Optional[np.ndarray] = None
        self._handles: List[Any] = []
        self.explain = True  # name what changed, rank by rank (a gather); off once it is known
        self._fired = np.zeros(len(self._watched), dtype=bool)  # got a gradient in this backward
        self.group = group
        # one int per watched parameter carries both facts: got a gradient (0/1) + base * its
        # requires_grad differs from the build (0/1); summed over the ranks, each stays readable
        self._base = ddist.group_size(group) + 1
        self._pending: Optional[Tuple[np.ndarray, torch.Tensor, Any]] = None

    def close(self) -> None:
        """Finish an outstanding flag exchange (every rank calls this)."""
        self._drop_pending()
        self._unhook()

    def _unhook(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _drop_pending(self) -> None:
        if self._pending is not None and self._pending[2] is not None:
            self._pending[2].wait()
        self._pending = None

    def before_backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """Call before ``loss.backward()`` (``sync``: DDP synchronises gradients in this one).

        Gradients are read, not hooked, when every ``.grad`` starts as ``None`` (``zero_grad()``,
        MMEngine's default): then a parameter got one in this backward, and in this optimizer step,
        if its ``.grad`` is set. Where ``.grad`` is already set (accumulation, ``zero_grad(
        set_to_none=False)``) a post-accumulate hook per parameter tells, for this backward only:
        ``.grad`` versions cannot, since DDP's bucket-view gradients share one version counter per
        bucket. One hook on the loss, which autograd runs first, queues the flag exchange for the
        end of a synchronising backward.
        """
        self._drop_pending()
        self._unhook()
        self._arrived = None
        if sync and any(p.grad is not None and p.requires_grad for p in self._watched):
            arrived = self._arrived = np.zeros(len(self._watched), dtype=bool)
            self._handles = [p.register_post_accumulate_grad_hook(partial(_arrive, arrived, i))
                             for i, p in enumerate(self._watched) if p.requires_grad]
        if sync and loss.requires_grad:
            loss.register_hook(self._queue_launch)

    def _queue_launch(self, _: torch.Tensor) -> None:
        Variable._execution_engine.queue_callback(self._launch)

    def _launch(self) -> None:
        """End of the backward: every gradient of it has arrived, so the flags are final. Start
        their exchange now, to run beside DDP's last bucket all-reduces and the fills below."""
        n, w = len(self.params), len(self._watched)
        local = np.array([p.grad is not None for p in self._watched], dtype=bool)
        rg = np.array([p.requires_grad for p in self._watched], dtype=bool)
        changed = rg != self._built
        # outside the reducer only what requires grad now counts: a stale .grad of a frozen
        # parameter is nothing to average
        local[n:] &= rg[n:]
        self._fired = local if self._arrived is None else self._arrived
        self._unhook()  # the fills below are not arrivals
        flags = np.empty(w + 1, dtype=np.int32)
        flags[:w] = local + self._base * changed
        # what the rescue will fill, other than parameters frozen since the build
        flags[-1] = np.count_nonzero(~self._fired[:n] & ~self._fill & ~changed[:n])
        flags = torch.from_numpy(flags)
        self._pending = (local, flags, ddist.all_reduce_flags(flags, self.group, async_op=True))

    def after_backward(self, reducer) -> Optional[str]:
        """Fill, rescue, agree, fix. Returns why usage differs from the plan (same on every
        rank), or None."""
        n, w = len(self.params), len(self._watched)
        self.trainable_change = None
        if self._pending is None:  # not queued: no hook on the loss, or it needed no gradient
            self._launch()
        local, flags, work = self._pending
        self._pending = None
        fill = self._fill & ~self._fired[:n]
        zero_fill([self.params[i].param for i in np.flatnonzero(fill)])
        rescued: List[int] = []
        if not reducer_finalized(reducer):
            rescued = [int(i) for i in np.flatnonzero(~self._fired[:n] & ~fill)]
            zero_fill([self.params[i].param for i in rescued])
            if not reducer_finalized(reducer):
                self._raise_unfinalized(reducer)
        if work is not None:
            work.wait()
        counts = flags.numpy()
        self.record(local[:n])
        if counts[:n].all() and (counts[:n] < self._base).all() and not counts[n:].any():
            return None  # as planned on every rank
        got, changed = counts[:w] % self._base, counts[:w] // self._base
        size = self._base - 1
        if ((changed > 0) & (changed < size)).any():
            self._raise_rank_dependent()
        changed = changed == size  # the same change on every rank
        now = np.array([p.requires_grad for p in self._watched], dtype=bool)
        unused_everywhere = np.flatnonzero(got[:n] == 0)
        for i in unused_everywhere:  # None on every rank before the fills: True leaves it None
            self.params[i].param.grad = None
        if got[n:].any():  # ignored, or frozen at the build and trainable now
            self._average_off_reducer(got[n:])
        if changed.any():
            for i in np.flatnonzero(changed & ~now):  # frozen in this step: None, as if frozen
                self._watched[i].grad = None          # before it (gradients of the window too)
            self.trainable_change = TrainableChange(
                unfrozen=[self.names[i] for i in np.flatnonzero(changed & now)],
                frozen=[self.names[i] for i in np.flatnonzero(changed & ~now)])
        unused_everywhere = [i for i in unused_everywhere if not changed[i]]
        woke = [j for j in range(len(self.ignored)) if got[n + j] and not changed[n + j]]
        rescued = [i for i in rescued if not changed[i]]
        if not unused_everywhere and not woke and not counts[-1]:  # a trainable change only
            return None
        if not self.explain:
            return 'usage differs from the plan'
        return self._describe([self.params[i].name for i in rescued],
                              [self.params[i].name for i in unused_everywhere],
                              [self.ignore_names[j] for j in woke if local[n + j]])

    def record(self, used: np.ndarray) -> None:
        """What this rank used in one optimizer step (the probe keeps it)."""

    def _raise_unfinalized(self, reducer) -> None:
        try:
            reducer._check_reducer_finalized()
        except RuntimeError as e:
            raise type(e)(explain_unused_error(str(e), self.params) + (
                '\n[mmddp_hooks] the guard could not complete this iteration although it fed '
                'zeros to every parameter whose gradient did not arrive')) from e

    def _describe(self, rescued: List[str], unused_everywhere: List[str],
                  woke: List[str]) -> str:
        """Rare path, entered by every rank together: name what changed, rank by rank."""
        local: Dict[str, Any] = {'rank': ddist.get_rank(), 'rescued': rescued, 'woke': woke}
        everyone = ddist.all_gather_object(local, self.group)
        parts = []
        if unused_everywhere:
            parts.append(f'{len(unused_everywhere)} parameters got no gradient on any rank '
                         f'({_names(unused_everywhere)}); their gradients stay None as under '
                         'find_unused_parameters=True')
        for r in everyone:
            if r['rescued']:
                parts.append(f"rank {r['rank']}: {len(r['rescued'])} parameters the plan counted "
                             f"on got no gradient ({_names(r['rescued'])}); rescued with zero "
                             'gradients as find_unused_parameters=True would')
            if r['woke']:
                parts.append(f"rank {r['rank']}: ignored parameters woke up ({_names(r['woke'])}); "
                             'their gradients were averaged by hand in the same step')
        return '; '.join(parts)

    def _raise_rank_dependent(self) -> None:
        """Every rank, same step: name each rank's own change, then stop before the optimizer."""
        everyone = ddist.all_gather_object((ddist.get_rank(), self.trainable.change()), self.group)
        raise RuntimeError(rank_dependent_message(
            {r: c for r, c in everyone if c}, [r for r, c in everyone if not c]))

    def _average_off_reducer(self, counts: np.ndarray) -> None:
        """Data plane: each gradient outside DDP's reducer that some rank got (woken ignored ones,
        newly trainable ones), same order on every rank, on its device and in its dtype, over the
        wrapper's group; divided before the sum, as DDP's reducer does."""
        off = self._watched[len(self.params):]
        average_by_hand([p for i, p in enumerate(off) if counts[i] > 0], self.group)


def average_by_hand(params: List[torch.Tensor], group: Optional[ProcessGroup]) -> None:
    """Average ``params``' gradients over ``group`` (zeros where a rank got none), as DDP would."""
    size = ddist.group_size(group)
    for p in params:
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        p.grad = ddist.all_reduce_(grad.mul(1.0 / size), group)


def _arrive(arrived: np.ndarray, i: int, _: torch.Tensor) -> None:
    arrived[i] = True


def _names(names: List[str], n: int = 8) -> str:
    return ', '.join(names[:n]) + (' ...' if len(names) > n else '')
