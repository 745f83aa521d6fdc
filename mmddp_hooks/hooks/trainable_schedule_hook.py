"""TrainableScheduleHook: freeze and unfreeze parameters on a schedule, on every rank at once."""
import copy
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Set

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import IterBasedTrainLoop
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..schedule import (
    ScheduleEntry,
    ScheduleError,
    due_in_order,
    parse_schedule,
    resolve_schedule,
    scheduled_unfreezes,
)
from ..text import names
from ..trainable import TrainableChange, optimizer_params


@HOOKS.register_module()
class TrainableScheduleHook(Hook):
    """Change ``requires_grad`` at given iterations or epochs (see :mod:`mmddp_hooks.schedule`).

    ``ReconfigurableDDP`` follows each change exactly (the new set is averaged from the step it
    shows in). What this hook adds around ``requires_grad``:

    * the schedule is checked against the built model before training;
    * the optimizer holds what gets unfrozen: MMEngine's constructor with a ``paramwise_cfg``
      skips parameters that do not require grad when it builds the optimizer. The optimizer is
      then built again, from the config, with the scheduled parameters trainable, so each gets
      the options the constructor gives it (``lr_mult``, ``decay_mult``, ``custom_keys``, a custom
      constructor's own rules) and the param schedulers cover it; until its unfreeze its gradient
      is ``None``, which optimizers skip. A constructor that still leaves one out is an error;
    * norm layers: a BatchNorm whose parameters the schedule froze is kept in eval mode (running
      statistics frozen too), as mmseg/mmdet ``frozen_stages`` do, and returns to train mode when
      unfrozen. A backbone whose ``frozen_stages`` covers an unfrozen parameter gets its
      ``frozen_stages`` lowered to the largest value that keeps it trainable, since those
      backbones freeze their stages again at every ``model.train()``;
    * resume: every entry due at the resumed iteration is applied before training goes on.

    Args:
        schedule: ``[dict(at=ITER or at_epoch=EPOCH, freeze=[globs], unfreeze=[globs]), ...]``.
    """

    priority = 'VERY_HIGH'

    def __init__(self, schedule: List[dict]) -> None:
        self.entries = parse_schedule(schedule)
        self._applied: Set[int] = set()
        self._eval_norms: List[nn.Module] = []
        self._frozen: Set[str] = set()  # frozen by this schedule (or left frozen by it)

    def before_run(self, runner) -> None:
        module = _module(runner)
        by_iter = isinstance(runner.train_loop, IterBasedTrainLoop)
        if by_iter:
            by_epoch = [e.label() for e in self.entries if e.at_epoch is not None]
            if by_epoch:
                raise ScheduleError(f'{by_epoch[0]}: at_epoch needs an epoch-based train loop '
                                    '(train_cfg by_epoch=True); this one counts iterations: use at')
        resolve_schedule(self.entries, module,
                         None if by_iter else len(runner.train_loop.dataloader))
        self._hold_in_optimizer(runner, module)

    def _hold_in_optimizer(self, runner, module: nn.Module) -> None:
        """Build the optimizer again with the parameters the schedule unfreezes trainable, when
        its constructor saw them frozen and treats frozen parameters apart: MMEngine >= 0.10.4's
        paramwise constructor skips them, older ones give them the base options without
        ``custom_keys``; either way not what they would have had as trainable parameters."""
        named = dict(module.named_parameters())
        scheduled = scheduled_unfreezes(self.entries)
        held = optimizer_params(runner.optim_wrapper)
        missing = [n for n in scheduled if id(named[n]) not in held]
        # built again with these trainable: frozen now, or left out however they were
        frozen = [n for n in scheduled if not named[n].requires_grad or n in missing]
        cfg = runner.cfg.get('optim_wrapper')
        if not isinstance(cfg, dict):
            if missing:
                raise ScheduleError(f'the optimizer does not hold {len(missing)} parameters the '
                                    f'schedule unfreezes ({names(missing, 4)}) and it was '
                                    'not built from a config, so it cannot be built again with '
                                    'them')
            return
        if not (missing or (frozen and ('paramwise_cfg' in cfg or 'constructor' in cfg))):
            return
        with _trainable([named[n] for n in frozen]):
            wrapper = runner.build_optim_wrapper(copy.deepcopy(cfg))
            runner.scale_lr(wrapper, runner.auto_scale_lr)
        still = [n for n in frozen if id(named[n]) not in optimizer_params(wrapper)]
        if still:
            raise ScheduleError(f'the optimizer constructor leaves out {len(still)} parameters '
                                f'the schedule unfreezes ({names(still, 4)}) even when they '
                                'require grad: once unfrozen they would never be updated. Add '
                                'them to its param groups.')
        if runner.param_schedulers and runner.cfg.get('param_scheduler') is None:
            raise ScheduleError('the optimizer must be built again with the parameters the '
                                'schedule unfreezes, but the param schedulers bound to it were not '
                                'built from the config (no param_scheduler key), so they cannot '
                                'be built again for it')
        runner.optim_wrapper = wrapper
        if runner.cfg.get('param_scheduler') is not None:
            runner.param_schedulers = runner.build_param_scheduler(
                copy.deepcopy(runner.cfg.param_scheduler))
        runner.logger.info(f'[mmddp_hooks] optimizer built again with the {len(frozen)} '
                           f'parameters the schedule unfreezes later '
                           f'({names(frozen, 4)}) '
                           'trainable: its constructor had built it with them frozen (skipped, '
                           'or without their paramwise options); each has its options, and its '
                           'gradient stays None until it is unfrozen')

    def before_train(self, runner) -> None:
        self._apply_due(runner)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._apply_due(runner)
        for m in self._eval_norms:  # the loop's model.train() ran before this hook
            m.eval()

    def _apply_due(self, runner) -> None:
        due = due_in_order(self.entries, self._applied, runner.iter, runner.epoch)
        for e in due:
            self._apply(runner, e)
            self._applied.add(e.index)
        if due:
            self._eval_norms = _norms_within(_module(runner), self._frozen)

    def _apply(self, runner, e: ScheduleEntry) -> None:
        module = _module(runner)
        named = dict(module.named_parameters())
        change = TrainableChange(unfrozen=[n for n in e.unfrozen if not named[n].requires_grad],
                                 frozen=[n for n in e.frozen if named[n].requires_grad])
        for n in e.frozen:
            named[n].requires_grad_(False)
        self._frozen |= set(e.frozen)
        for n in e.unfrozen:
            named[n].requires_grad_(True)
        self._frozen -= set(e.unfrozen)
        for note in _lower_frozen_stages(module, set(e.unfrozen), self._frozen):
            runner.logger.info(f'[mmddp_hooks] {note}')
        for m in _norms_within(module, set(e.unfrozen)):
            m.train(module.training)
        runner.logger.info(f'[mmddp_hooks] {e.label()}: {change.describe()}')


def _module(runner) -> nn.Module:
    return runner.model.module if is_model_wrapper(runner.model) else runner.model


@contextmanager
def _trainable(params: List[nn.Parameter]) -> Iterator[None]:
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _norms_within(module: nn.Module, names: Set[str]) -> List[nn.Module]:
    """BatchNorm layers whose every parameter is in ``names``."""
    out = []
    for prefix, m in module.named_modules():
        own = [f'{prefix}.{n}' if prefix else n for n, _ in m.named_parameters(recurse=False)]
        if isinstance(m, _BatchNorm) and own and all(n in names for n in own):
            out.append(m)
    return out


def _frozen_by_stages(m: nn.Module, k: int) -> Set[int]:
    """ids of the parameters ``m._freeze_stages()`` freezes with ``frozen_stages=k`` (m unchanged)."""
    params = list(m.parameters())
    flags = [p.requires_grad for p in params]
    modes = [(s, s.training) for s in m.modules()]
    old = m.frozen_stages
    try:
        for p in params:
            p.requires_grad_(True)
        m.frozen_stages = k
        m._freeze_stages()
        return {id(p) for p in params if not p.requires_grad}
    finally:
        m.frozen_stages = old
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        for s, mode in modes:
            s.training = mode


def _lower_frozen_stages(module: nn.Module, unfrozen: Set[str], frozen: Set[str]) -> List[str]:
    """Lower ``frozen_stages`` of backbones that would freeze ``unfrozen`` again at the next
    ``model.train()``; what they froze beyond the new value stays frozen (and in ``frozen``)."""
    notes = []
    named = dict(module.named_parameters())
    ids = {id(named[n]) for n in unfrozen}
    for prefix, m in module.named_modules():
        k = getattr(m, 'frozen_stages', None)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0 or \
                not callable(getattr(m, '_freeze_stages', None)):
            continue
        before = _frozen_by_stages(m, k)
        if not before & ids:
            continue
        new: Optional[int] = next(j for j in range(k - 1, -2, -1)
                                  if not _frozen_by_stages(m, j) & ids)
        still = before - _frozen_by_stages(m, new) - ids
        by_id: Dict[int, str] = {id(p): n for n, p in named.items()}
        frozen |= {by_id[i] for i in still}
        m.frozen_stages = new
        notes.append(f'{prefix or type(m).__name__}.frozen_stages {k} -> {new}: it freezes its '
                     'stages again at every model.train(), which would undo the unfreeze'
                     + (f'; {len(still)} params it froze stay frozen' if still else ''))
    return notes
