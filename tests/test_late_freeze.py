"""The verdict is about plain DDP as the config builds it: a model that freezes its backbone after
the Runner wrapped it in DDP (in the backbone's train(), in train() called by an optimizer
constructor, in a hook's before_train; projects/late_freeze). For each, the doctor's verdict and
what it says of the other setting, against plain MMDistributedDataParallel run with
find_unused_parameters False and True."""
import late_freeze_cases
import pytest
from test_research_code import doctor_json

from mmddp_hooks.ranks import run_distributed

pytestmark = [pytest.mark.dist]
ITERS = 3
CRASH = 'Expected to have finished reduction in the prior iteration'
WHERE = {'freeze_in_train': ("train() of PromptedBackbone, called in the train loop's "
                             'model.train() before iteration 1',
                             'projects/late_freeze/models.py:31: p.requires_grad = False'),
         'constructor_calls_train': ('train() of PromptedBackbone, called in the optimizer '
                                     'constructor TrainModeConstructor',
                                     'projects/late_freeze/models.py:31: p.requires_grad = False'),
         'hook_freezes': ('FreezeBackboneHook.before_train', 'projects/late_freeze/models.py:68: '
                          'model.backbone.layers.requires_grad_(False)')}


@pytest.fixture(scope='module')
def results():
    rows = run_distributed(late_freeze_cases.runs, 2, args=(ITERS,), timeout=400)
    return rows[0]


@pytest.mark.parametrize('config', late_freeze_cases.CONFIGS)
def test_the_verdict_agrees_with_plain_ddp_under_each_setting(results, config):
    for find_unused in (False, True):
        plain, found = results[config, find_unused]['plain'], results[config, find_unused]['doctor']
        late = found['wrap_time']
        assert late['frozen'] == ['backbone.layers.0.weight', 'backbone.layers.0.bias',
                                  'backbone.layers.2.weight', 'backbone.layers.2.bias']
        assert [(c['phase'], c['lines']) for c in late['changes']] == [
            (WHERE[config][0], [WHERE[config][1]])]
        text = found['wrap_time_text']
        assert text.startswith('the trainable set changed after DDP was built')
        assert f'with find_unused_parameters=False it waits for the 4 frozen parameters and ' \
               f'stops with "{CRASH}' in text and 'model_wrapper_cfg = dict(type=' in text
        if not find_unused:  # plain DDP crashes at iteration 2, and the doctor says so
            assert CRASH in plain['error'] and plain['losses'] == 1, plain
            assert found['crashes'] and CRASH in found['crash_reason']
            assert WHERE[config][1] in found['crash_reason']
        else:  # plain DDP trains; the doctor says so, and that True was needed for it
            assert plain['error'] is None and plain['losses'] == ITERS, plain
            assert not found['crashes'] and found['crash_reason'] is None
            assert not any(r.startswith('find_unused_parameters=True was not needed')
                           for r in found['auto']['reasons'])
            assert any(r.startswith('plain DDP needs find_unused_parameters=True here (4 '
                                    'parameters it registered at the wrap are frozen afterwards')
                       for r in found['auto']['reasons'])
        # the usage itself is measured on the set that trains: nothing unused there
        assert found['report']['counts']['never used'] == 0


def test_the_doctor_exits_1_and_says_it_first():
    code, found, log = doctor_json(f'{late_freeze_cases.EXAMPLES}/freeze_in_train.py',
                                   '--iters', 1)
    assert code == 1 and found['status'] == 1, log[-3000:]
    assert 'in __init__ (PromptedBackbone.__init__ at projects/late_freeze/models.py:17)' in \
        found['wrap_time_text']


def test_the_verdict_line_for_true_says_it_was_needed():
    import ddp_doctor

    out = dict(status=0, crashes_without_hook=False, asked_find_unused=True, has_hook=False,
               wrap_time=dict(frozen=['a', 'b']))
    assert ddp_doctor._verdict(out) == (
        'trains under DDP as written, because of find_unused_parameters=True: 2 parameters DDP '
        'registered at the wrap are frozen afterwards (with False it would crash at iteration 2)')
