"""Record, per optimizer step and rank, which reducer parameters received a gradient.

The probe is the guard of an empty plan (``find_unused_parameters=False``, nothing ignored or filled)
that also keeps what it saw: each probe step trains exactly as ``find_unused_parameters=True`` would
(see :mod:`mmddp_hooks.guard`), while DDP itself runs as ``False`` does. ``True`` is not needed and
sometimes cannot run: with reentrant activation checkpointing (``torch.utils.checkpoint``'s default,
OpenMMLab's ``with_cp=True``) it raises "marked as ready twice". The probe notices such checkpoints
in the loss's autograd graph, so the plan never switches to ``True`` there.

It also records what qualifies "used": whether the local gradient that arrived was exactly zero
(read on the device, once per probe, never per step) and whether a zero-weighted term (``x * 0``)
in the loss's graph reached the parameter: research code keeps idle branches "used" that way. And
the batch's kind (:mod:`mmddp_hooks.batch_kinds`), which often decides which branch runs.
"""
import hashlib
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.overrides import TorchFunctionMode

from . import batch_kinds
from . import dist as ddist
from .arrival import GradArrival
from .guard import PlanGuard
from .report import Usage
from .text import code_line, innermost_user
from .trainable import TrainableChange, TrainableSet

REENTRANT_NODE = 'CheckpointFunctionBackward'
MUL_NODES = ('MulBackward0', 'MulBackward1')


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


def _zero_scalar(node: Any) -> bool:
    """A multiplication node one of whose saved factors is a CPU number equal to 0 (``x * 0.0``
    saves the 0 as a CPU scalar even for a CUDA ``x``: read without a device sync)."""
    for attr in ('_saved_other', '_saved_self'):
        try:
            factor = getattr(node, attr)
        except RuntimeError:  # not saved for this backward
            continue
        if isinstance(factor, torch.Tensor) and factor.device.type == 'cpu' and \
                factor.numel() == 1 and not factor.requires_grad and factor.item() == 0:
            return True
        if isinstance(factor, (int, float)) and factor == 0:
            return True
    return False


def zero_weighted_reach(loss: torch.Tensor, lines: Dict[Any, str]) -> Dict[int, Set[str]]:
    """``{id(leaf tensor): where}`` for every leaf that a zero-weighted term of ``loss`` reaches:
    a multiplication by 0 in its autograd graph (``where`` from ``lines``, the nodes a
    :class:`ZeroTermTracer` saw made, else the node's name)."""
    seen, stack, zeros = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in MUL_NODES and (node in lines or _zero_scalar(node)):
            zeros.append(node)
        stack.extend(fn for fn, _ in node.next_functions)
    reach: Dict[int, Set[str]] = {}
    for zero in zeros:
        where = lines.get(zero, f'{type(zero).__name__} (a multiplication by 0)')
        below, stack = set(), [fn for fn, _ in zero.next_functions]
        while stack:
            node = stack.pop()
            if node is None or node in below:
                continue
            below.add(node)
            variable = getattr(node, 'variable', None)
            if variable is not None:
                reach.setdefault(id(variable), set()).add(where)
            stack.extend(fn for fn, _ in node.next_functions)
    return reach


_MULS = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
_OURS = os.path.dirname(os.path.abspath(__file__)) + os.sep
_SKIPPED = (os.path.dirname(torch.__file__) + os.sep, _OURS)


def _caller_line() -> str:
    """``path:line: code`` of the innermost frame outside torch and this package: where the term
    is written, an installed library's own code too (the report tells those apart)."""
    frames, frame = [], sys._getframe(2)
    while frame is not None:
        frames.insert(0, frame)
        frame = frame.f_back
    user = innermost_user([f.f_code.co_filename for f in frames], lambda path: path.startswith(_SKIPPED))
    if user is None:
        return '(unknown line)'
    return code_line(frames[user].f_code.co_filename, frames[user].f_lineno)


class ZeroTermTracer(TorchFunctionMode):
    """While active, remembers where each multiplication by a Python 0 was made (its autograd
    node -> ``path:line: code``): the source line of a zero-weighted term. A Python-level hook on
    every torch call, so only the DDP doctor turns it on, for its probe's forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: Dict[Any, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _MULS and isinstance(out, torch.Tensor) and out.grad_fn is not None and \
                any(isinstance(a, (int, float)) and not isinstance(a, bool) and a == 0
                    for a in args):
            self.lines[out.grad_fn] = _caller_line()
        return out


class UsageProbe:
    """What each rank used in each optimizer step, read from the record of gradient arrival,
    while a guard of the empty plan completes every step as ``find_unused_parameters=True``
    would (the probe uses the guard; the guard knows nothing of the probe)."""

    def __init__(self, module: nn.Module, group: Optional[ProcessGroup] = None,
                 trainable: Optional[TrainableSet] = None,
                 arrival: Optional[GradArrival] = None) -> None:
        self.guard = PlanGuard(module, fill=[], ignore=[], group=group, trainable=trainable,
                               arrival=arrival)
        self.guard.explain = False  # unused parameters are what the probe is there to find
        self.params = self.guard.params
        self.group = group
        self.arrival = self.guard.arrival
        self._at = self.arrival.indices([rp.param for rp in self.params])
        self.steps: List[np.ndarray] = []
        self.reentrant_checkpoint = False
        # per step: which reducer parameters a zero-weighted term reached, and which local
        # gradients were not all zero (device flags, read once in gather)
        self.zero_weighted: List[np.ndarray] = []
        self.nonzero: List[List[Tuple[np.ndarray, torch.Tensor]]] = []
        self.zero_terms: Dict[str, Set[str]] = {}
        self.batch: List[batch_kinds.Cell] = []  # the batch's kind per step
        self.tracer: Optional[ZeroTermTracer] = None
        self._index = {id(rp.param): i for i, rp in enumerate(self.params)}
        self._by_record = {int(j): i for i, j in enumerate(self._at)}
        self._reached = np.zeros(len(self.params), dtype=bool)
        self._flags: Dict[int, torch.Tensor] = {}
        self._batches: List[batch_kinds.Cell] = []

    @property
    def trainable_change(self) -> Optional[TrainableChange]:
        return self.guard.trainable_change

    def before_backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """The guard's, and a look for reentrant checkpointing and zero-weighted terms in this
        step's graph; each local gradient that arrives is checked for being all zero."""
        if not self.reentrant_checkpoint and loss.grad_fn is not None:
            self.reentrant_checkpoint = uses_reentrant_checkpoint(loss)
        if loss.grad_fn is not None:
            self._look_for_zero_terms(loss)
        self.guard.before_backward(loss, sync)
        self.arrival.on_defined = self._flag

    def after_backward(self, reducer) -> Optional[str]:
        """The guard's step, exchanged on every rank; then this step's local usage is kept."""
        self.arrival.on_defined = None  # the guard's fills are not this backward's gradients
        change = self.guard.after_backward(reducer, exchange=True)
        self.steps.append(self.arrival.window[self._at])
        self._record_zeros()
        return change

    def close(self) -> None:
        self.arrival.on_defined = None
        self.guard.close()

    # ------------------------------------------------------------------- zero-weighted terms
    def _look_for_zero_terms(self, loss: torch.Tensor) -> None:
        reach = zero_weighted_reach(loss, self.tracer.lines if self.tracer else {})
        for key, where in reach.items():
            i = self._index.get(key)
            if i is not None:
                self._reached[i] = True
                self.zero_terms.setdefault(self.params[i].name, set()).update(where)
        if self.tracer is not None:
            self.tracer.lines.clear()

    def _flag(self, j: int, grad: torch.Tensor) -> None:
        """A local gradient of the record's parameter ``j`` (before DDP averages it)."""
        i = self._by_record.get(j)
        if i is None:
            return
        nonzero = grad.ne(0).any() if grad.layout == torch.strided else torch.tensor(True)
        self._flags[i] = nonzero if i not in self._flags else self._flags[i] | nonzero

    def _record_zeros(self) -> None:
        by_device: Dict[torch.device, List[int]] = {}
        for i, flag in self._flags.items():
            by_device.setdefault(flag.device, []).append(i)
        self.nonzero.append([(np.array(idx), torch.stack([self._flags[i] for i in idx]))
                             for idx in by_device.values()])
        self.zero_weighted.append(self._reached)
        self._reached = np.zeros(len(self.params), dtype=bool)
        self._flags = {}

    def local_zero(self) -> np.ndarray:
        """(iterations, params): the gradient that arrived was exactly zero (one device read)."""
        zero = np.zeros((len(self.nonzero), len(self.params)), dtype=bool)
        for step, parts in enumerate(self.nonzero):
            for idx, flags in parts:
                zero[step, idx] = ~flags.cpu().numpy()
        return zero & self.local_usage()

    # ---------------------------------------------------------------------------- batch kinds
    def note_batch(self, batch: Any, names: Sequence[str] = batch_kinds.ATTRIBUTES) -> None:
        """The kind of this iteration's batch; merged over an optimizer step's iterations."""
        self._batches.append(batch_kinds.batch_attributes(batch, names))
        while len(self.batch) < len(self.steps):
            self.batch.append(batch_kinds.merge(self._batches))
            self._batches = []

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
        return self._with_records(Usage(names=names, numels=[rp.numel for rp in self.params],
                                        used=np.stack(used),
                                        reentrant_checkpoint=any(g[4] for g in gathered)))

    def _with_records(self, usage: Usage) -> Usage:
        """``usage`` with every rank's zero-gradient, zero-weighted-term and batch-kind records:
        a gather of its own (control plane, every rank, once), bits packed as the usage's are."""
        n, p = usage.n_iters, len(self.params)
        zero = self.local_zero()[:n]
        weighted = np.stack(self.zero_weighted[:n]) if n else np.zeros((0, p), bool)
        local = (np.packbits(zero, axis=None), np.packbits(weighted, axis=None),
                 {k: sorted(v) for k, v in self.zero_terms.items()}, (self.batch + [{}] * n)[:n])
        gathered = ddist.all_gather_object(local, self.group)

        def unpacked(bits: np.ndarray) -> np.ndarray:
            return np.unpackbits(bits, count=n * p).astype(bool).reshape(n, p)
        usage.zero = np.stack([unpacked(g[0]) for g in gathered])
        usage.zero_weighted = np.stack([unpacked(g[1]) for g in gathered])
        for _, _, terms, _ in gathered:
            for name, where in terms.items():
                usage.zero_terms[name] = sorted(set(usage.zero_terms.get(name, [])) | set(where))
        usage.batch = [g[3] for g in gathered]
        return usage
