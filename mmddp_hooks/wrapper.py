"""``ReconfigurableDDP``: MMDistributedDataParallel that can change its DDP settings mid-training.

DDP fixes ``find_unused_parameters``, ``static_graph`` and the ignored set when it builds its reducer.
This wrapper re-runs DDP's constructor on itself (every rank, same iteration), so ``runner.model`` stays
the same object: the optimizer keeps its parameters and state, and hooks holding ``runner.model`` or
``runner.model.module`` (EMA, checkpointing) keep working. It also makes CPU/gloo runs work as they
would on GPUs: ``device_ids`` is dropped for CPU modules and SyncBN is reverted to BN.
"""
import itertools
import logging
from typing import Any, Dict, List, Optional, Union

import torch
from mmengine.logging import print_log
from mmengine.model import MMDistributedDataParallel, revert_sync_batchnorm
from mmengine.model.utils import detect_anomalous_params
from mmengine.optim import OptimWrapper
from mmengine.registry import MODEL_WRAPPERS
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import dist as ddist
from .arrival import GradArrival
from .autotune import AutoTuner, ProbeSettings
from .compat import never_compiled
from .explain import UNUSED_MARKER, explain_unused_error
from .guard import PlanGuard, average_by_hand, reducer_finalized, zero_fill
from .plan import DDPPlan
from .probe import UsageProbe
from .reducer_params import ignore_keys_for, reducer_params
from .report import Usage
from .trainable import TrainableChange, TrainableSet, rank_dependent_message, where_now
from .wrap_time import WrapTimeWatch, registered

_MODULE_HOOK_DICTS = ('_forward_hooks', '_forward_hooks_with_kwargs', '_forward_hooks_always_called',
                      '_forward_pre_hooks', '_forward_pre_hooks_with_kwargs', '_backward_hooks',
                      '_backward_pre_hooks', '_state_dict_hooks', '_state_dict_pre_hooks',
                      '_load_state_dict_pre_hooks', '_load_state_dict_post_hooks')
# DDP arguments a rebuild in place cannot honour: DDP registers their hooks on the module again at
# every construction (delayed all-reduce, mixed precision), and builds no reducer at all when every
# parameter is delayed.
_NOT_REBUILDABLE = ('delay_all_reduce_named_params', 'param_to_hook_all_reduce', 'mixed_precision')
# Valid only while the unused set never changes (torch: else DDP hangs or desynchronises); the plan
# changes DDP's settings exactly when usage changes, and already keeps never-used parameters out.
_FIXED_USAGE_ONLY = ('skip_all_reduce_unused_params',)


_WRAPPERS = itertools.count()


def _release_reducer(ddp: DistributedDataParallel) -> None:
    """Unhook DDP's reducer and let it go, with its buckets, before a new one is built: DDP drops
    it only when it assigns the next, so both sets of buckets (the gradients' size again) would be
    alive at once. DDP's logger holds it too. Gradients that are views of its buckets
    (``gradient_as_bucket_view=True`` with ``.grad`` set) keep their bucket until the new reducer
    has copied them into its own."""
    ddp.reducer._remove_autograd_hooks()
    ddp.reducer = ddp.logger = None


def _on_cpu(module: nn.Module) -> bool:
    return all(p.device.type == 'cpu' for p in module.parameters())


@MODEL_WRAPPERS.register_module()
class ReconfigurableDDP(MMDistributedDataParallel):
    """Drop-in for ``MMDistributedDataParallel`` whose DDP settings can be replaced by a plan.

    Args:
        module: the model to wrap.
        detect_anomalous_params: as in ``MMDistributedDataParallel``.
        trainable_change_timeout: seconds a rank that saw ``requires_grad`` change waits for the
            others to report the same change, where no guard's exchange runs every step
            (``find_unused_parameters=True`` plans, or no DDPAutoTuneHook); past it, training
            stops with the ranks named. Generous: under NCCL a rank can be a step behind (rank 0
            saving a checkpoint), and a false alarm would stop a correct run.
        **kwargs: ``DistributedDataParallel`` arguments. ``device_ids``/``output_device`` are dropped
            for CPU modules (DDP rejects them there; MMEngine always passes ``[LOCAL_RANK]``).

    The trainable set is followed: a parameter that starts or stops requiring grad between two
    steps, on every rank, is averaged (or left ``None``) in the step where the change shows, and
    DDP is rebuilt with the new set before the next forward (see :mod:`mmddp_hooks.trainable`).
    """

    def __init__(self, module: nn.Module, detect_anomalous_params: bool = False,
                 trainable_change_timeout: float = 300.0, **kwargs: Any) -> None:
        refused = [k for k in _NOT_REBUILDABLE if kwargs.get(k) is not None]
        if refused:
            raise ValueError(f'model_wrapper_cfg sets {refused}: ReconfigurableDDP rebuilds DDP in '
                             'place, which these arguments do not survive (DDP would register their '
                             'hooks again at each rebuild). Remove them, or train without '
                             "DDPAutoTuneHook (type='MMDistributedDataParallel').")
        for key in _FIXED_USAGE_ONLY:
            if kwargs.pop(key, None):
                print_log(f'[mmddp_hooks] model_wrapper_cfg.{key}=True is not passed to DDP: it is '
                          'valid only while the unused parameters never change, and the plan '
                          'changes DDP exactly when they do (never-used parameters are kept out of '
                          "DDP's all-reduce by the plan itself).", logger='current',
                          level=logging.WARNING)
        if _on_cpu(module):
            kwargs.pop('device_ids', None)
            kwargs.pop('output_device', None)
            module = revert_sync_batchnorm(module)
        # what the user set DDP to ignore (parameters and buffers) stays ignored through every plan
        self._user_ignored = list(getattr(module, '_ddp_params_and_buffers_to_ignore', ()))
        super().__init__(module=module, detect_anomalous_params=detect_anomalous_params, **kwargs)
        # every DDP argument the config gave is given again by each rebuild (the plan overrides
        # find_unused_parameters and static_graph only)
        self.config_kwargs: Dict[str, Any] = dict(kwargs)
        self.plan: Optional[DDPPlan] = None
        self.probe: Optional[UsageProbe] = None
        # what probes, plans and switches: DDPAutoTuneHook's, or one with default settings
        self.tuner = AutoTuner(self, ProbeSettings())
        self.guard: Optional[PlanGuard] = None
        self.switch_log: List[str] = []  # why the plan was left, one entry per change
        self.trainable = TrainableSet(self.module, self._user_ignored)  # what DDP averages now
        # which parameters got a defined gradient, backward by backward: what the probe, the
        # guard and trainable-set following read (never .grad)
        self.arrival = GradArrival(list(self.module.parameters()))
        self.wrap_time: Optional[WrapTimeWatch] = WrapTimeWatch(self.trainable)  # until training
        self.trainable_changes: List[TrainableChange] = []  # each change of the trainable set
        self.trainable_log: List[str] = []  # and how it was logged
        self.trainable_change_timeout = trainable_change_timeout
        self._trainable_change: Optional[TrainableChange] = None
        # store tags: wrappers are made in the same order on every rank, as are the exchanges
        self._store_tag = f'trainable/{next(_WRAPPERS)}'
        self._store_exchanges = 0
        self._syncs_backward = True  # whether the last forward prepared a synchronising backward
        self.bucket_strides = self._current_strides()
        self._comm_hook_record: Optional[List[tuple]] = []
        if ddist.is_dist():  # made here, where every rank wraps at once: a collective
            ddist.control_group(self.process_group)

    def register_comm_hook(self, state: object, hook: Any) -> None:
        """DDP's ``register_comm_hook``, remembered so that a rebuild registers the hook again.

        Recorded here rather than read back from DDP, whose own list does not exist in every
        supported torch; hooks DDP's constructor registers for itself are not recorded.
        """
        super().register_comm_hook(state, hook)
        if self.__dict__.get('_comm_hook_record') is not None:
            self._comm_hook_record.append((state, hook))

    def _current_strides(self) -> Dict[str, tuple]:
        """Parameter strides as DDP saw them when it built its bucket views."""
        return {n: p.stride() for n, p in self.module.named_parameters()}

    @classmethod
    def from_ddp(cls, ddp: DistributedDataParallel) -> 'ReconfigurableDDP':
        """Re-wrap a model that a runner already wrapped in (MM)DistributedDataParallel."""
        reducer = registered(ddp)
        _release_reducer(ddp)  # the old wrapper drives nothing any more (DoubleWrapCheckHook skips it)
        kwargs = dict(find_unused_parameters=ddp.find_unused_parameters,
                      broadcast_buffers=ddp.broadcast_buffers,
                      bucket_cap_mb=ddp.bucket_bytes_cap / (1024 * 1024),
                      gradient_as_bucket_view=ddp.gradient_as_bucket_view,
                      static_graph=ddp.static_graph, process_group=ddp.process_group)
        if ddp.device_ids:
            kwargs['device_ids'] = ddp.device_ids
        wrapper = cls(ddp.module, getattr(ddp, 'detect_anomalous_params', False), **kwargs)
        wrapper.wrap_time = WrapTimeWatch(wrapper.trainable, reducer)  # as ddp registered them
        return wrapper

    # ----------------------------------------------------------------------------------- rebuild
    def rebuild(self, find_unused_parameters: bool, static_graph: bool = False,
                ignore: Union[List[str], None] = None) -> None:
        """Rebuild DDP on this object with new settings. A collective: call on every rank."""
        module = self.module
        _release_reducer(self)
        keys = ignore_keys_for(module, ignore or [])
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            module, self._user_ignored + [k for k in keys if k not in self._user_ignored])
        kwargs = dict(self.config_kwargs, find_unused_parameters=find_unused_parameters,
                      static_graph=static_graph)
        training = self.training
        module.train(training)  # before the build: a model's train() may change requires_grad
        hooks = {k: getattr(self, k) for k in _MODULE_HOOK_DICTS if hasattr(self, k)}
        comm_hooks, self._comm_hook_record = self._comm_hook_record, None
        MMDistributedDataParallel.__init__(self, module, self.detect_anomalous_params, **kwargs)
        for k, v in hooks.items():
            setattr(self, k, v)
        self.training = training
        self._comm_hook_record = []
        for state, hook in comm_hooks:
            self.register_comm_hook(state, hook)
        self.bucket_strides = self._current_strides()
        self.trainable = TrainableSet(module, self._user_ignored)

    def refresh_buckets(self) -> None:
        """Rebuild with the current settings, so bucket views follow the parameters' layouts."""
        names = [n for n, p in self.module.named_parameters()]
        keys = set(getattr(self.module, '_ddp_params_and_buffers_to_ignore', ()))
        ignored = [n for n in names if n in keys or f'.{n}' in keys]
        self.rebuild(self.find_unused_parameters, self.static_graph, ignored)

    def start_probe(self) -> None:
        """Probe under ``find_unused_parameters=False``, each step completed as ``True`` would."""
        self.close_guard()
        if self.probe is not None:
            self.probe.close()
        self.rebuild(find_unused_parameters=False)
        self.probe = UsageProbe(self.module, self.process_group, self.trainable, self.arrival)

    def finish_probe(self) -> Usage:
        """Stop recording and combine every rank's usage (a collective)."""
        assert self.probe is not None, 'finish_probe() without start_probe()'
        probe, self.probe = self.probe, None
        probe.close()
        return probe.gather()

    def apply_plan(self, plan: DDPPlan) -> None:
        """Rebuild DDP as the plan says and arm the guard. A collective: call on every rank."""
        self.close_guard()
        named = dict(self.module.named_parameters())
        unknown = [n for n in plan.ignore if n not in named]
        if unknown:
            raise KeyError(f'the plan names parameters this model does not have: {unknown[:5]}')
        self.rebuild(plan.find_unused_parameters, plan.static_graph, plan.ignore)
        self.plan = plan
        if plan.guarded:
            ranks = range(ddist.group_size(self.process_group))
            self.guard = PlanGuard(self.module,
                                   plan.fill.get(ddist.group_rank(self.process_group), []),
                                   plan.ignore, group=self.process_group, trainable=self.trainable,
                                   unclaimed=set.intersection(*(set(plan.fill.get(r, []))
                                                                for r in ranks)),
                                   arrival=self.arrival)

    def close_guard(self) -> None:
        """Remove the guard's hooks and drop it."""
        if self.guard is not None:
            self.guard.close()
            self.guard = None

    # -------------------------------------------------------------------------------- train step
    def _run_forward(self, data: Union[dict, tuple, list], mode: str) -> Any:
        """DDP's forward; its index-only unused-parameter error is re-raised with names."""
        try:
            return super()._run_forward(data, mode)
        except RuntimeError as e:
            if UNUSED_MARKER not in str(e):
                raise
            raise type(e)(explain_unused_error(str(e), reducer_params(self.module))) from e

    def _watcher(self):
        return self.probe if self.probe is not None else self.guard

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        self._syncs_backward = self.require_backward_grad_sync  # False inside no_sync()
        return super().forward(*inputs, **kwargs)

    @never_compiled
    def before_backward(self, loss: torch.Tensor) -> None:
        """Call before each ``loss.backward()`` (the guard tells what arrives in this one)."""
        watcher = self._watcher()
        if watcher is not None:
            watcher.before_backward(loss, sync=self._syncs_backward)
        else:
            self.arrival.open()

    @never_compiled
    def after_backward(self) -> Optional[str]:
        """Call after a synchronising backward, before the optimizer step: the step is completed
        as ``find_unused_parameters=True`` would. Returns why usage left the plan, or None."""
        watcher = self._watcher()
        if watcher is None:
            self.arrival.close_backward()
            self.arrival.end_window()
            self._trainable_change = self._follow_unguarded()
            return None
        change = watcher.after_backward(self.reducer)
        self._trainable_change = watcher.trainable_change
        return change if watcher is self.guard else None

    @never_compiled
    def after_step(self, change: Optional[str]) -> None:
        """Call after the optimizer step with what ``after_backward`` returned (every rank): log a
        trainable-set change, then the tuner leaves a plan usage left and rebuilds for the set."""
        trainable, self._trainable_change = self._trainable_change, None
        if trainable:
            text = f'trainable set changed{where_now()}: {trainable.describe()}'
            self.trainable_changes.append(trainable)
            self.trainable_log.append(text)
            print_log(f'[mmddp_hooks] {text}; that step was averaged as DDP built with the new set '
                      'would have, and every rank rebuilds DDP with it now', logger='current')
        self.tuner.after_step(change, trainable)

    def _follow_unguarded(self) -> Optional[TrainableChange]:
        """Where no guard exchanges flags every step: a rank that sees its trainable set changed
        asks the others through the store (nothing is exchanged while nothing changes), then fixes
        the step as the guard does. Returns the change, or None."""
        change = self.trainable.change()
        if not change:
            return None
        try:
            posted = ddist.store_agree(f'{self._store_tag}/{self._store_exchanges}', change,
                                       self.process_group, self.trainable_change_timeout)
        except ddist.StoreTimeout as e:
            raise RuntimeError(rank_dependent_message(
                e.posted, e.missing, self.trainable_change_timeout)) from None
        self._store_exchanges += 1
        if posted is not None:
            raise RuntimeError(rank_dependent_message(posted))
        named = dict(zip(self.trainable.names, self.trainable.params))
        averaged = self.trainable.averaged
        reached, window, index = self.arrival.reached, self.arrival.window, self.arrival.index
        frozen_in_reducer = [named[n] for n in change.frozen
                             if id(named[n]) in averaged and not reached[index[id(named[n])]]]
        if frozen_in_reducer and not reducer_finalized(self.reducer):  # False: it waits for them
            zero_fill(frozen_in_reducer)
        # every rank is at this step (they agreed on the change): a collective is safe here
        got = torch.tensor([bool(window[index[id(named[n])]]) for n in change.unfrozen],
                           dtype=torch.int32)
        used = ddist.all_reduce_flags(got, self.process_group).tolist()
        average_by_hand([named[n] for n, u in zip(change.unfrozen, used) if u], self.process_group)
        for n in change.frozen:
            named[n].grad = None
        return change

    @never_compiled
    def _backward(self, loss: torch.Tensor, scaled: torch.Tensor,
                  optim_wrapper: OptimWrapper) -> None:
        """``before_backward(loss)``, then the backward of ``scaled``, both eager under
        ``compile=True``: the hooks the probe and guard put on the loss and the parameters run
        inside the backward, and would otherwise be traced as frames of the compiled step (the
        model's backward graph itself stays compiled)."""
        self.before_backward(loss)
        optim_wrapper.backward(scaled)

    def train_step(self, data: Union[dict, tuple, list],
                   optim_wrapper: OptimWrapper) -> Dict[str, torch.Tensor]:
        """``MMDistributedDataParallel.train_step`` with the probe/guard between backward and step."""
        with optim_wrapper.optim_context(self):
            data = self.module.data_preprocessor(data, training=True)
            losses = self._run_forward(data, mode='loss')
        parsed_loss, log_vars = self.module.parse_losses(losses)
        self._backward(parsed_loss, optim_wrapper.scale_loss(parsed_loss), optim_wrapper)
        change = None
        if optim_wrapper.should_update():
            change = self.after_backward()
            optim_wrapper.step()
            optim_wrapper.zero_grad()
        if self.detect_anomalous_params:
            detect_anomalous_params(parsed_loss, model=self)
        self.after_step(change)
        return log_vars
