"""Make every ``find_unused_parameters=False`` step train exactly as ``find_unused_parameters=True``.

A plan keeps DDP on ``False`` because the probe saw a fixed usage: parameters never used (DDP-ignored)
and parameters unused on some ranks (zero-filled there). Usage can change later: a warm-up branch
wakes up, another switches off. The guard decides such changes by gradients, never by calls (a stage
that runs but whose output is dropped, or a head called in a no-grad val loop, changes nothing), and
fixes the step in which they happen, before the optimizer sees it. What arrived is read from the
wrapper's record of gradient arrival (:mod:`mmddp_hooks.arrival`: which parameters the engine
reached, and which got a *defined* gradient), never from ``.grad``, which DDP itself writes. After
each synchronising backward:

1. zero-fill what the plan expects to be unused on this rank and the engine did not reach; if the
   reducer still did not finalise, zero-fill every reducer parameter the engine did not reach (the
   *rescue*: each slot then holds what ``True`` would have put there). A parameter reached with no
   gradient (a custom Function's ``None``) is never filled: DDP marked it ready already. Both come
   from this rank's own record, before any wait: a fill can complete DDP's last bucket, whose
   all-reduce waits for every rank's;
2. decide, from this rank alone, whether its step left the plan: the reducer needed the rescue, a
   parameter the plan counted on here got no defined gradient in this optimizer step, a parameter
   outside the reducer (ignored) got one, or ``requires_grad`` differs from when DDP was built. As
   planned, every reducer parameter got a gradient on some rank and nothing else did, so the ranks
   need to agree on one bit only;
3. agree on that bit: one int reduced over the control tree (:class:`mmddp_hooks.dist.ControlTree`,
   gloo point-to-point messages up and down a tree of the ranks, nothing read from a GPU). That is
   the guard's whole per-step exchange: the same few bytes per rank at any number of ranks, and a
   latency that grows as ``log N``;
4. only in a step some rank left the plan, on every rank: sum one int per watched parameter over
   the tree (did it get a defined gradient on this rank since the last optimizer step?), with the
   count of what this rank completed with zeros and whether its reducer is still unfinished (then
   every rank stops in that step, none left waiting for another), and fix the step: where no rank
   used a parameter, its gradient goes back to what it was before the step (``None`` after
   ``zero_grad()``), as ``True`` leaves it (a zero would still move it through momentum and weight
   decay); where an ignored parameter got a gradient on any rank, it is averaged by hand on the DDP
   group (``g / world_size``, summed, as DDP's reducer does), so a branch that wakes up trains from
   its first step.

Every rank sees the same sums, so all of them agree, at the same step, that usage changed and on the
switch to a safer plan.

The same int per parameter carries whether its ``requires_grad`` differs from when DDP was built
(:mod:`mmddp_hooks.trainable`): a freeze or unfreeze is then fixed in the step where it shows (a newly
trainable parameter averaged by hand, a newly frozen one back to ``None``) and is not a usage change;
a change on some ranks only stops training in that step, on every rank, with the names.
"""
from operator import attrgetter
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.distributed import ProcessGroup, ReduceOp

from . import dist as ddist
from .arrival import GradArrival
from .explain import explain_unused_error
from .reducer_params import ReducerParam, reducer_params
from .text import names
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
        unclaimed: parameters the plan zero-fills on every rank (none that ``choose_plan`` makes):
            a step where one gets no gradient here may have left it unused everywhere.
        arrival: the wrapper's record of gradient arrival (default: one of the guard's own,
            removed by :meth:`close`).
    """

    def __init__(self, module: nn.Module, fill: List[str], ignore: List[str],
                 group: Optional[ProcessGroup] = None,
                 trainable: Optional[TrainableSet] = None, unclaimed: Sequence[str] = (),
                 arrival: Optional[GradArrival] = None) -> None:
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
        self._built_flags = [built[id(p)] for p in self._watched]
        self._owns_arrival = arrival is None
        self.arrival = arrival if arrival is not None else GradArrival(self._watched)
        self._at = self.arrival.indices(self._watched)  # watched -> the record's positions
        n = len(self.params)
        self._at_off = self._at[n:]
        self.trainable_change: Optional[TrainableChange] = None  # set by the step it shows in
        fill_names, unclaimed_names = set(fill), set(unclaimed)
        self._fill = np.array([rp.name in fill_names for rp in self.params], dtype=bool)
        self._fill_at = [(i, self.params[i].param) for i in np.flatnonzero(self._fill)]
        self._at_counted = self._at[:n][~self._fill]  # what the plan counts on here
        self._unclaimed = {i for i, rp in enumerate(self.params) if rp.name in unclaimed_names}
        # whose freeze the record cannot show, since they get no gradient here either way: this
        # rank's zero-filled parameters and the ignored ones (any other freeze or unfreeze shows in
        # the record: a frozen reducer parameter is not reached, an unfrozen one outside it arrives)
        self._flag_watch = [p for _, p in self._fill_at] + self.ignored
        self._flag_watch_built = [built[id(p)] for p in self._flag_watch]
        # requires_grad differs from the build before this backward (the step takes the full
        # exchange, which names the change on every rank)
        self._flags_moved = False
        self.explain = True  # name what changed, rank by rank (a gather); off once it is known
        self.group = group
        size = ddist.group_size(group)
        self._alone = size == 1
        # one int per watched parameter carries both facts: got a gradient (0/1) + base * its
        # requires_grad differs from the build (0/1); summed over the ranks, each stays readable
        self._base = size + 1
        self._left = torch.zeros(1, dtype=torch.int32)  # this step left the plan (0/1), reduced

    def close(self) -> None:
        """Remove the guard's hooks (those of its own record)."""
        if self._owns_arrival:
            self.arrival.close()

    def before_backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """Call before ``loss.backward()`` (``sync``: DDP synchronises gradients in this one).

        Opens the record of this backward's arrivals; before a synchronising one, also reads
        ``requires_grad`` of the parameters whose freeze no arrival can show (zero-filled here,
        or ignored), after every hook of this iteration: a flag moved since the build sends the
        step through the full exchange.
        """
        self.arrival.open()
        if sync and self._flag_watch:
            self._flags_moved = list(map(_REQUIRES_GRAD, self._flag_watch)) != self._flag_watch_built

    def after_backward(self, reducer, exchange: bool = False) -> Optional[str]:
        """Fill, rescue, agree, and where some rank left the plan, fix. Returns why usage differs
        from the plan (the same on every rank), or None. ``exchange``: take the full exchange
        even where no rank left the plan (every rank passes the same).

        The fills and the rescue come first, from this rank's own record: a zero fill can
        complete DDP's last bucket, whose all-reduce waits for every rank's, so no rank may wait
        in an exchange before its own buckets are complete. Only a parameter the engine did not
        reach is filled: one reached with no gradient (a custom Function's ``None``) was marked
        ready by DDP already, with a zero in its bucket slot.
        """
        self.trainable_change = None
        record = self.arrival
        record.close_backward()
        record.end_window()  # read below; the next backward opens a new one
        planned = not (self._fill_at or self._flags_moved or record.was_none or exchange) and \
            record.window[self._at_counted].all() and not record.window[self._at_off].any() \
            and reducer_finalized(reducer)  # as planned here, told with the fewest reads
        if planned and (self._alone or not self._agree(False)):
            return None
        n = len(self.params)
        reached = record.reached[self._at[:n]]
        filled = [i for i, _ in self._fill_at if not reached[i]]
        rescued: List[int] = []
        # whether .grad was None before this backward, where this step may have to restore it
        was_none = {i: self.params[i].param.grad is None for i in filled}
        zero_fill([self.params[i].param for i in filled])
        finalized = reducer_finalized(reducer)
        if not finalized:  # a parameter the reducer waits for was not reached: feed it zeros
            rescued = [i for i in np.flatnonzero(~reached) if i not in was_none]
            was_none.update({i: self.params[i].param.grad is None for i in rescued})
            zero_fill([self.params[i].param for i in rescued])
        if record.was_none:  # reached with no gradient: read by the record
            back = {int(j): i for i, j in enumerate(self._at[:n])}
            was_none.update({back[j]: v for j, v in record.was_none.items() if j in back})
        window = record.window[self._at]
        missed = ~window[:n] & ~self._fill  # the plan counted on them here: no gradient came
        left = bool(not finalized or self._flags_moved or missed.any() or window[n:].any()
                    or not self._unclaimed.isdisjoint(filled))
        self._flags_moved = False
        if not (exchange or planned):  # (planned: agreed above that some other rank left)
            if self._alone and not left:
                return None
            if not self._agree(left):
                return None  # as planned on every rank
        return self._fix(reducer, window, missed, was_none)

    def _agree(self, left: bool) -> bool:
        """Whether any rank's step left the plan: one int, reduced over the control tree."""
        self._left[0] = left
        return bool(ddist.all_reduce_flags(self._left, self.group, ReduceOp.MAX)[0])

    def _fix(self, reducer, window: np.ndarray, missed: np.ndarray,
             was_none: Dict[int, bool]) -> Optional[str]:
        """The rare path, on every rank together: sum per-parameter flags over the ranks, fix.

        ``window``: defined arrivals since the last optimizer step, per watched parameter;
        ``missed``: reducer parameters the plan counted on here that got none; ``was_none``:
        whether ``.grad`` was None before this backward, for those DDP or the fills wrote."""
        n, w = len(self.params), len(self._watched)
        rg = np.array(list(map(_REQUIRES_GRAD, self._watched)), dtype=bool)
        changed = rg != np.array(self._built_flags, dtype=bool)
        # outside the reducer only what requires grad now counts
        local = window.copy()
        local[n:] &= rg[n:]
        flags = np.empty(w + 2, dtype=np.int32)
        flags[:w] = local + self._base * changed
        flags[w] = np.count_nonzero(missed & ~changed[:n])  # completed with zeros here
        flags[w + 1] = not reducer_finalized(reducer)  # even after the rescue: every rank stops
        counts = ddist.all_reduce_flags(torch.from_numpy(flags), self.group).numpy()
        if counts[w + 1]:
            self._raise_unfinalized(reducer, int(counts[w + 1]))
        if counts[:n].all() and (counts[:n] < self._base).all() and not counts[n:w + 1].any():
            return None  # as planned on every rank
        got, changed = counts[:w] % self._base, counts[:w] // self._base
        size = self._base - 1
        if ((changed > 0) & (changed < size)).any():
            self._raise_rank_dependent()
        changed = changed == size  # the same change on every rank
        unused_everywhere = np.flatnonzero(got[:n] == 0)
        for i in unused_everywhere:  # True leaves .grad as it was before the step
            if was_none.get(i, True):
                self.params[i].param.grad = None
        if got[n:].any():  # ignored, or frozen at the build and trainable now
            self._average_off_reducer(got[n:w])
        if changed.any():
            for i in np.flatnonzero(changed & ~rg):  # frozen in this step: None, as if frozen
                self._watched[i].grad = None          # before it (gradients of the window too)
            self.trainable_change = TrainableChange(
                unfrozen=[self.names[i] for i in np.flatnonzero(changed & rg)],
                frozen=[self.names[i] for i in np.flatnonzero(changed & ~rg)])
        unused_everywhere = [i for i in unused_everywhere if not changed[i]]
        woke = [j for j in range(len(self.ignored)) if got[n + j] and not changed[n + j]]
        if not unused_everywhere and not woke and not counts[w]:  # a trainable change only
            return None
        if not self.explain:
            return 'usage differs from the plan'
        completed = [i for i in np.flatnonzero(missed) if not changed[i] and got[i]]  # used elsewhere
        return self._describe([self.params[i].name for i in completed],
                              [self.params[i].name for i in unused_everywhere],
                              [self.ignore_names[j] for j in woke if local[n + j]])

    def _raise_unfinalized(self, reducer, ranks: int) -> None:
        """Every rank, same step (the count came through the exchange): none waits in a later
        collective for one that raised."""
        try:
            reducer._check_reducer_finalized()
        except RuntimeError as e:
            raise type(e)(explain_unused_error(str(e), self.params) + (
                '\n[mmddp_hooks] the guard could not complete this iteration although it fed '
                'zeros to every parameter whose gradient did not arrive')) from e
        raise RuntimeError(f'[mmddp_hooks] {ranks} other rank(s) could not complete this '
                           "iteration's gradient reduction (their error names the parameters); "
                           'every rank stops here')

    def _describe(self, rescued: List[str], unused_everywhere: List[str],
                  woke: List[str]) -> str:
        """Rare path, entered by every rank together: name what changed, rank by rank."""
        local: Dict[str, Any] = {'rank': ddist.get_rank(), 'rescued': rescued, 'woke': woke}
        everyone = ddist.all_gather_object(local, self.group)
        parts = []
        if unused_everywhere:
            parts.append(f'{len(unused_everywhere)} parameters got no gradient on any rank '
                         f'({names(unused_everywhere, 8)}); their gradients stay None as under '
                         'find_unused_parameters=True')
        for r in everyone:
            if r['rescued']:
                parts.append(f"rank {r['rank']}: {len(r['rescued'])} parameters the plan counted "
                             f"on got no gradient ({names(r['rescued'], 8)}); rescued with zero "
                             'gradients as find_unused_parameters=True would')
            if r['woke']:
                parts.append(f"rank {r['rank']}: ignored parameters woke up ({names(r['woke'], 8)}); "
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


# read in C, per step
_REQUIRES_GRAD = attrgetter('requires_grad')
