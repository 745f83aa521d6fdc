"""Watch, after each synchronising backward, what a ``find_unused_parameters=False`` plan assumed.

Two things can break such a plan later in training: a parameter the plan counted on gets no gradient
(DDP then waits forever on a bucket on the other ranks and raises "Expected to have finished
reduction" on this one), or a parameter the plan DDP-ignored wakes up (its gradient is then never
averaged and replicas drift apart silently). After backward the guard

1. zero-fills the gradients the plan expects to be missing on this rank (see :mod:`mmddp_hooks.plan`);
   (modules the plan froze are watched by forward pre-hooks: a call means the branch woke up; it
   produced no gradient, so nothing diverges, and all ranks unfreeze it at the next exchange);
2. asks the reducer whether the iteration finalised; if not, it zero-fills every parameter still
   without a gradient, which completes the missing buckets and releases the peers waiting on them
   (the iteration is rescued). For a parameter unused on some ranks this is what
   ``find_unused_parameters=True`` does; for one unused on every rank it is not: True leaves its
   gradient ``None``, while here it is zero, so momentum and weight decay still move it that step;
3. all-reduces one small int vector: per ignored parameter, how many ranks gave it a gradient, whether
   a frozen module was called, and the number of rescued parameters. When any is non-zero, every
   rank learns it from the same collective, averages the woken ignored gradients by hand, and
   reports a switch to a safe plan, so all ranks rebuild DDP at the same iteration.

Step 3 is one all-reduce of ``len(plan.ignore) + 2`` CPU ints on the gloo control plane (see
:mod:`mmddp_hooks.dist`), the whole cost of the guard; nothing in it reads a CUDA tensor. It runs every
step, synchronously, only when the plan ignores parameters; otherwise every ``interval`` steps in the
background (rescues stay complete and local every step; the switch lands at most two intervals later).
Woken gradients are averaged on the DDP wrapper's own group, on their device.
"""
from typing import Any, List, Optional, Tuple

import torch
from torch import nn
from torch.distributed import ProcessGroup

from . import dist as ddist
from .explain import explain_unused_error
from .reducer_params import ReducerParam, reducer_params


def zero_fill(params: List[torch.Tensor]) -> None:
    """Run each parameter's AccumulateGrad with zeros, firing DDP's reducer hook for it."""
    if params:
        torch.autograd.backward(params, [torch.zeros_like(p) for p in params])


def reducer_finalized(reducer) -> bool:
    try:
        reducer._check_reducer_finalized()
    except RuntimeError:
        return False
    return True


class PlanGuard:
    """Per-rank state of the guard for one applied plan."""

    def __init__(self, module: nn.Module, fill: List[str], ignore: List[str],
                 interval: int = 16, watch_modules: Optional[List[str]] = None,
                 group: Optional[ProcessGroup] = None) -> None:
        named = dict(module.named_parameters())
        modules = dict(module.named_modules())
        self.params: List[ReducerParam] = reducer_params(module)
        self.fill = [named[n] for n in fill]
        self.ignore_names = list(ignore)
        self.ignored = [named[n] for n in ignore]
        # flags: one per ignored parameter, then "a frozen module was called", then "rescued"
        self._woke = torch.zeros(len(self.ignored) + 2, dtype=torch.int32)
        self._handles = [p.register_post_accumulate_grad_hook(self._waker(i))
                         for i, p in enumerate(self.ignored)]
        self.woken_modules: List[str] = []
        self._handles += [modules[m].register_forward_pre_hook(self._module_waker(m))
                          for m in watch_modules or []]
        self._pending: Optional[Tuple[torch.Tensor, Any, List[str]]] = None
        self.interval = max(1, interval)
        self._steps = 0
        self._unreported: List[str] = []
        self.group = group  # the DDP wrapper's process_group (None: the default group)

    def _waker(self, i: int):
        def wake(_: torch.Tensor) -> None:
            self._woke[i] = 1
        return wake

    def _module_waker(self, name: str):
        def wake(*_: Any) -> None:
            self._woke[-2] = 1
            if name not in self.woken_modules:
                self.woken_modules.append(name)
        return wake

    def close(self) -> None:
        """Remove the hooks and finish an outstanding flag exchange (every rank calls this)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._pending is not None and self._pending[1] is not None:
            self._pending[1].wait()
        self._pending = None

    def after_backward(self, reducer) -> Optional[str]:
        """Fill, rescue, agree. Returns why every rank must switch to a safe plan, or None.

        With ignored parameters the flags are needed before the optimizer step (a woken gradient
        must be averaged first), so the exchange is synchronous, every step. Without, a rescue is
        already complete locally and only the switch needs agreeing on: the exchange runs in the
        background every ``interval`` steps and is read at the next exchange, when every rank
        switches together.
        """
        zero_fill([p for p in self.fill if p.grad is None])
        rescued: List[str] = []
        if not reducer_finalized(reducer):
            missing = [rp for rp in self.params if rp.param.grad is None]
            zero_fill([rp.param for rp in missing])
            rescued = [rp.name for rp in missing]
            if not reducer_finalized(reducer):
                self._raise_unfinalized(reducer)
        flags = self._woke.clone()
        flags[-1] = len(rescued)
        self._woke.zero_()
        if self.ignored:
            ddist.all_reduce_flags(flags, self.group)
            return self._agree_on_switch(flags, rescued) if bool(flags.any()) else None
        self._unreported.extend(n for n in rescued if n not in self._unreported)
        self._steps += 1
        if self._steps % self.interval:
            return None
        flags[-1] = len(self._unreported)
        flags[-2] = int(bool(self.woken_modules))
        work = ddist.all_reduce_flags(flags, self.group, async_op=True)
        previous, self._pending = self._pending, (flags, work, self._unreported)
        self._unreported = []
        if previous is None:
            return None
        prev_flags, work, prev_rescued = previous
        if work is not None:
            work.wait()
        return self._agree_on_switch(prev_flags, prev_rescued) if bool(prev_flags.any()) else None

    def _raise_unfinalized(self, reducer) -> None:
        try:
            reducer._check_reducer_finalized()
        except RuntimeError as e:
            raise type(e)(explain_unused_error(str(e), self.params) + (
                '\n[mmddp_hooks] the guard could not rescue this iteration: some parameters '
                'without a new gradient still hold one from an earlier backward (gradient '
                'accumulation or grads not set to None). Use find_unused_parameters=True.')) from e

    def _agree_on_switch(self, flags: torch.Tensor, rescued: List[str]) -> str:
        """Rare path, entered by every rank together: average woken ignored grads, name causes."""
        woke = [i for i in range(len(self.ignored)) if int(flags[i]) > 0]
        # every rank reaches here together; a frozen module's call leaves no gradient to fix
        if woke:
            self._average_ignored(flags)
        local = {'rank': ddist.get_rank(), 'rescued': rescued, 'modules': list(self.woken_modules),
                 'woke': [self.ignore_names[i] for i in woke if self.ignored[i].grad is not None]}
        everyone = ddist.all_gather_object(local, self.group)
        parts = []
        for r in everyone:
            if r['rescued']:
                parts.append(f"rank {r['rank']}: {len(r['rescued'])} parameters the plan counted on "
                             f"got no gradient ({', '.join(r['rescued'][:8])}"
                             f"{' ...' if len(r['rescued']) > 8 else ''}); rescued with zero "
                             'gradients as find_unused_parameters=True would')
            if r['modules']:
                parts.append(f"rank {r['rank']}: frozen modules were called "
                             f"({', '.join(r['modules'][:8])}); they did not train since the "
                             'plan froze them and are unfrozen now')
            if r['woke']:
                parts.append(f"rank {r['rank']}: ignored parameters woke up "
                             f"({', '.join(r['woke'][:8])}); their gradients were averaged by hand")
        return '; '.join(parts)

    def _average_ignored(self, flags: torch.Tensor) -> None:
        """Data plane: the ignored gradients, on their device, over the wrapper's group."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.ignored]
        flat = ddist.all_reduce_(torch.cat([g.reshape(-1) for g in grads]), self.group)
        flat /= ddist.group_size(self.group)
        offset = 0
        for i, p in enumerate(self.ignored):
            n = p.numel()
            if int(flags[i]) > 0:
                p.grad = flat[offset:offset + n].view_as(p).clone()
            else:
                p.grad = None  # unused on every rank: None, as find_unused_parameters=True leaves it
            offset += n
