"""TrainableScheduleHook's checks and its frozen_stages/norm handling, single process."""
import pytest
from torch import nn

from mmddp_hooks.hooks.trainable_schedule_hook import _lower_frozen_stages, _norms_within
from mmddp_hooks.schedule import ScheduleError, due_in_order, parse_schedule, resolve_schedule
from mmddp_hooks.trainable import TrainableSet


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 2)
        self.aux = nn.Linear(4, 2)


def _resolve(schedule):
    entries = parse_schedule(schedule)
    resolve_schedule(entries, Toy())
    return entries


@pytest.mark.parametrize('schedule, message', [
    ([], 'must be a non-empty list'),
    ([dict(at=3, unfreeze=['head.*'], when=4)], "schedule[0] has unknown keys ['when']"),
    ([dict(unfreeze=['head.*'])], 'schedule[0] needs exactly one of at=ITER or at_epoch=EPOCH'),
    ([dict(at=3, at_epoch=1, unfreeze=['head.*'])], 'needs exactly one of'),
    ([dict(at=-1, unfreeze=['head.*'])], 'schedule[0].at must be an int >= 0, got -1'),
    ([dict(at=2)], 'schedule[0] freezes and unfreezes nothing'),
    ([dict(at=2, freeze=[3])], 'schedule[0].freeze must be a glob or a list of globs'),
    ([dict(at=2, freeze='head.*'), dict(at=5, unfreeze=['backbone.2.*'])],
     "schedule[1] (at=5).unfreeze: 'backbone.2.*' matches no parameter of Toy"),
    ([dict(at=2, freeze=['head.*'], unfreeze=['head.weight'])],
     "schedule[0] (at=2) both freezes and unfreezes ['head.weight']"),
    ([dict(at=2, freeze=['aux.*']), dict(at=2, unfreeze=['aux.bias'])],
     "schedule[0] (at=2) and schedule[1] (at=2) apply at the same time and disagree on "
     "['aux.bias']"),
])
def test_a_wrong_entry_is_named(schedule, message):
    with pytest.raises(ScheduleError) as e:
        _resolve(schedule)
    assert message in str(e.value)


def test_globs_resolve_to_names_and_a_string_is_one_glob():
    a, b = _resolve([dict(at=0, freeze='backbone.*'), dict(at_epoch=1, unfreeze=['backbone.1.*'])])
    assert a.frozen == ['backbone.0.weight', 'backbone.0.bias', 'backbone.1.weight',
                        'backbone.1.bias']
    assert b.unfrozen == ['backbone.1.weight', 'backbone.1.bias'] and b.when == 'at_epoch=1'
    assert a.due(0, 0) and not b.due(100, 0) and b.due(0, 1)


def test_norm_layers_whose_parameters_are_all_frozen():
    model = Toy()
    assert _norms_within(model, {'backbone.1.weight', 'backbone.1.bias'}) == [model.backbone[1]]
    assert _norms_within(model, {'backbone.1.weight'}) == []


def test_trainable_set_names_what_changed():
    model = Toy()
    trainable = TrainableSet(model)
    assert not trainable.change()
    model.head.requires_grad_(False)
    model.aux.weight.requires_grad_(True)
    change = trainable.change()
    assert change.frozen == ['head.weight', 'head.bias'] and change.unfrozen == []
    assert change.describe() == 'froze 2 params (head.weight, head.bias)'


@pytest.mark.mmseg
def test_frozen_stages_is_lowered_so_model_train_keeps_the_unfreeze():
    """mmseg's ResNet freezes stem..layer{frozen_stages} again at every model.train()."""
    from mmseg.models.backbones import ResNetV1c

    model = nn.Module()
    model.backbone = ResNetV1c(depth=18, frozen_stages=2)
    layer2 = {n for n, _ in model.named_parameters() if n.startswith('backbone.layer2.')}
    for n, p in model.named_parameters():
        if n in layer2:
            p.requires_grad_(True)
    frozen = set()
    notes = _lower_frozen_stages(model, layer2, frozen)
    assert model.backbone.frozen_stages == 1
    assert notes == ['backbone.frozen_stages 2 -> 1: it freezes its stages again at every '
                     'model.train(), which would undo the unfreeze']
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert layer2 <= trainable
    assert not any(n.startswith(('backbone.stem.', 'backbone.layer1.')) for n in trainable)
    assert model.backbone.layer1.training is False and model.backbone.layer2.training is True
    assert frozen == set()
    # unfreezing layer1 alone (stem stays frozen) lowers it to 0 and leaves nothing refrozen
    layer1 = {n for n, _ in model.named_parameters() if n.startswith('backbone.layer1.')}
    for n, p in model.named_parameters():
        if n in layer1:
            p.requires_grad_(True)
    _lower_frozen_stages(model, layer1, frozen)
    model.train()
    assert model.backbone.frozen_stages == 0
    assert all(p.requires_grad for n, p in model.named_parameters() if n in layer1)
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if n.startswith('backbone.stem.'))


def test_a_resumed_run_applies_what_it_missed_in_time_order():
    """Written out of order: freeze at 100, unfreeze at 50. Resumed at 120, the uninterrupted run
    had the parameter frozen (50 then 100), so the freeze must come last."""
    entries = _resolve([dict(at=100, freeze=['head.*']), dict(at=50, unfreeze=['head.*'])])
    assert [e.index for e in due_in_order(entries, set(), 120, 0)] == [1, 0]
    assert [e.index for e in due_in_order(entries, {1}, 120, 0)] == [0]


def test_an_epoch_entry_and_an_iteration_entry_at_the_same_iteration_that_disagree():
    entries = parse_schedule([dict(at=20, freeze=['aux.*']), dict(at_epoch=2, unfreeze=['aux.*'])])
    with pytest.raises(ScheduleError, match=r'schedule\[0\] \(at=20\) and schedule\[1\] '
                                            r'\(at_epoch=2\) apply at the same time'):
        resolve_schedule(entries, Toy(), iters_per_epoch=10)


def test_parameters_the_user_told_ddp_to_ignore_are_not_followed():
    """DDP never averages them, trainable or not: the guard must not average them by hand."""
    model = Toy()
    trainable = TrainableSet(model, user_ignored=['head.bias'])
    assert 'head.bias' not in trainable.names and 'head.weight' in trainable.names
