"""The one record of gradient arrival: which parameters received a *defined* gradient, per backward.

"Did this parameter get a gradient" cannot be read from ``.grad`` after a backward under DDP:

* a custom ``autograd.Function`` may return ``None`` for a parameter. The engine still runs its
  AccumulateGrad, DDP's hook fires, and under ``find_unused_parameters=False`` DDP writes its
  bucket (zeros, averaged) into ``.grad``; ``True`` marks a parameter used only for a defined
  gradient and leaves ``.grad`` as it was;
* ``zero_grad(set_to_none=False)`` and accumulation keep ``.grad`` set before the backward;
* DDP's bucket-view gradients share one version counter per bucket.

So one hook per parameter, on its AccumulateGrad (a tensor hook, which the engine calls with the
incoming gradient or ``None``), records two facts for the current backward: the engine *reached*
the parameter (DDP's hook fired: the reducer marked it ready, defined or not) and a *defined*
gradient arrived. ``window`` keeps the defined arrivals of every backward since the last
optimizer step (the micro-steps of an accumulation window). The probe's record, the guard's
decision and fixes, and trainable-set following all read this, never ``.grad``.

The hooks are registered once and stay (a per-backward registration costs more than the calls);
they record only while the record is open, so the guard's own zero fills are no arrivals.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

# where a parameter's gradient arrives, and what the probe does with it: (index, gradient)
OnDefined = Callable[[int, torch.Tensor], None]


class GradArrival:
    """Defined-gradient arrivals of ``params`` (deduplicated by identity), backward by backward.

    Integer parameters never get a gradient and are never hooked.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params: List[torch.Tensor] = list(params)
        self.index = {id(p): i for i, p in enumerate(self.params)}
        n = len(self.params)
        self.reached = np.zeros(n, dtype=bool)   # this backward: the AccumulateGrad ran
        self.defined = np.zeros(n, dtype=bool)   # this backward: a defined gradient arrived
        self.window = np.zeros(n, dtype=bool)    # every backward since the last optimizer step
        # reached with no gradient in this backward: whether .grad was None then (DDP's
        # False reducer writes its bucket there later; True would have left it as it was)
        self.was_none: Dict[int, bool] = {}
        self.on_defined: Optional[OnDefined] = None
        self._open = False
        self._window_done = True
        self._handles = [h for h in (_hook(p, partial(self._arrive, i))
                                     for i, p in enumerate(self.params)) if h is not None]

    def indices(self, params: Sequence[torch.Tensor]) -> np.ndarray:
        """Positions of ``params`` in this record (each must be one of its parameters)."""
        return np.fromiter((self.index[id(p)] for p in params), dtype=np.int64, count=len(params))

    def open(self) -> None:
        """Before a backward: start recording it (and a new window after an optimizer step)."""
        if self._window_done:
            self.window[:] = False
            self._window_done = False
        else:  # a backward of this window that nobody closed (a no_sync micro-step)
            self.window |= self.defined
        self.reached[:] = False
        self.defined[:] = False
        self.was_none = {}
        self._open = True

    def close_backward(self) -> None:
        """After a backward, before any zero fill: what arrives from now on is not the model's."""
        self._open = False
        self.window |= self.defined

    def end_window(self) -> None:
        """After the synchronising backward's fixes: the next backward opens a new window."""
        self._window_done = True

    def close(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._open = False

    def _arrive(self, i: int, grad: Optional[torch.Tensor]) -> None:
        if not self._open:
            return
        self.reached[i] = True
        if grad is None:
            self.was_none[i] = self.params[i].grad is None
            return
        self.defined[i] = True
        if self.on_defined is not None:
            self.on_defined(i, grad)


def _hook(p: torch.Tensor, fn: Any) -> Any:
    """A tensor hook on ``p`` even where it does not require grad now (the hook outlives the flag;
    None for an integer parameter)."""
    if not (p.is_floating_point() or p.is_complex()):
        return None
    frozen = not p.requires_grad
    if frozen:
        p.requires_grad_(True)
    try:
        return p.register_hook(fn)
    finally:
        if frozen:
            p.requires_grad_(False)
