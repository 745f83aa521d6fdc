"""Freeze/unfreeze mid-run (#22), through a real Runner on 2 and 3 gloo ranks.

Every case (tests/trainable_cases.py) against its reference, plain DDP with every parameter trainable
whose optimizer drops the gradients of the parameters frozen at each step: replicas bit-identical,
loss curve and final parameters bit for bit on 2 ranks and within 1e-6 on 3, after 100 iterations
with a val loop every 4, under every plan. Then what must stop (a change on some ranks only), and
what plain DDP does with an unfreeze (the replicas drift apart: the comparison can fail).
"""
import pytest

from mmddp_hooks.compat import paramwise_constructor_skips_frozen
from mmddp_hooks.ranks import run_distributed, run_on_ranks

import scenarios
import trainable_cases
from trainable_cases import CASES, ITERS

pytestmark = [pytest.mark.dist, pytest.mark.runner]

TOLERANCE = 1e-6
PLAN_FIND_UNUSED = {'find_unused_plan': True, 'accumulation_find_unused': True,
                    'wrapper_only_find_unused': True}
IGNORED = {'ignore_plan': ['stage4.0.bias', 'stage4.0.weight'],
           'during_probe': ['stage4.0.bias', 'stage4.0.weight']}


@pytest.fixture(scope='module', params=[2, 3], ids=lambda n: f'{n}ranks')
def trained(request):
    ranks = run_distributed(trainable_cases.run_cases, request.param, args=(list(CASES),),
                            timeout=600)
    return request.param, ranks


@pytest.mark.parametrize('name', list(CASES))
def test_trains_as_the_reference(trained, name):
    world_size, ranks = trained
    rows = [r[name] for r in ranks]
    scenarios.assert_trains_alike(rows, world_size, ITERS, TOLERANCE)
    row = rows[0]
    # one log line per change, at the iteration it happened (MMEngine's 1-based count)
    flips = CASES[name]['flips']
    assert len(row['trainable_log']) == len(flips), row['trainable_log']
    for (at, what, _), line in zip(flips, row['trainable_log']):
        done = {'unfreeze': 'unfroze', 'freeze': 'froze'}[what]
        assert f'at iteration {at + 1}: {done} ' in line, line
    # a trainable change is not a usage change: the plan holds
    assert row['switch_log'] == [], row['switch_log']
    assert row['current']['find_unused'] is PLAN_FIND_UNUSED.get(name, False)
    assert row['current']['ignored'] == IGNORED.get(name, [])


def test_plain_ddp_lets_the_replicas_drift_apart_on_an_unfreeze():
    digests = {r['digest'] for r in run_distributed(trainable_cases.plain_ddp_unfreeze, 2,
                                                    timeout=180)}
    assert len(digests) == 2


@pytest.mark.parametrize('model, find_unused, hook, what, module, rank', [
    ('AllUsed', False, True, 'freeze', 'trunk.0', 1),  # the guard's exchange: all stop there
    ('AllUsed', False, True, 'unfreeze', 'trunk.0', 1),
    # rank 0 zero-fills rank1_adapter, so its freeze there leaves the reducer content: the flags
    # read before backward still stop that step
    ('RankOneBranch', False, True, 'freeze', 'rank1_adapter', 0),
    ('ModalityDropout', True, True, 'freeze', 'trunk.0', 1),  # find_unused=True: the store
    ('AllUsed', True, False, 'unfreeze', 'trunk.0', 1),       # ReconfigurableDDP alone, no hook
])
def test_a_change_on_some_ranks_only_stops_with_names(model, find_unused, hook, what, module, rank):
    result = run_on_ranks(trainable_cases.rank_dependent, 2,
                          args=(model, find_unused, hook, what, module, rank),
                          timeout=120, failure_grace=20)
    assert not result.ok and not result.timed_out, result.describe()
    errors = '\n'.join(r.error or '' for r in result.ranks)
    assert 'changed on some ranks only at iteration 9' in errors, result.describe()
    done = {'freeze': 'froze', 'unfreeze': 'unfroze'}[what]
    assert f'rank {rank}: {done} 2 params ({module}.weight, {module}.bias)' in errors
    assert f'ranks [{1 - rank}]' in errors


def test_schedule_hook_with_paramwise_cfg_trains_as_the_reference():
    """MMEngine's constructor skipped trunk.0 (frozen when it built the optimizer): the hook builds
    the optimizer again with it, with its custom_keys options, so the unfreeze trains it."""
    for r in run_distributed(trainable_cases.schedule_with_paramwise, 2, timeout=300):
        assert r['bit_equal'] and r['loss_diff'] == 0.0, r
        assert r['optimized']['trunk.0.weight'] == dict(lr=0.01, weight_decay=0.0)
        assert r['optimized']['head.weight'] == dict(lr=0.02, weight_decay=0.01)
        assert [x.split(': ')[1] for x in r['trainable_log']] == [
            'unfroze 2 params (trunk.0.weight, trunk.0.bias)', 'froze 2 params (head.weight, head.bias)']


def test_resume_across_a_scheduled_change_trains_as_the_uninterrupted_run():
    for r in run_distributed(trainable_cases.resume_across_change, 2, timeout=300):
        assert r['resumed'] == r['straight'], r
        assert r['resumed_losses'] == r['straight_losses']
        # the unfreeze at 6 is restored from the schedule before iteration 11; the freeze at 12
        assert [x.split(': ')[0] for x in r['resumed_log']] == [
            'trainable set changed at iteration 11', 'trainable set changed at iteration 13']


def test_an_unfreeze_the_optimizer_cannot_follow_is_an_error_not_a_no_op():
    result = run_on_ranks(trainable_cases.hand_unfreeze_with_paramwise, 2, timeout=120)
    if not paramwise_constructor_skips_frozen():
        # mmengine < 0.10.4: the constructor held the frozen parameters (base options), so the
        # optimizer follows the unfreeze and the run trains
        assert result.ok, result.describe()
        return
    assert not result.ok and not result.timed_out, result.describe()
    for r in result.ranks:
        assert ('2 parameters were unfrozen at iteration 7 but the optimizer does not hold them '
                '(trunk.0.weight, trunk.0.bias)') in (r.error or ''), result.describe()


def test_a_parameter_the_user_told_ddp_to_ignore_stays_rank_local():
    rows = run_distributed(trainable_cases.user_ignored_param, 2, timeout=180)
    for r in rows:  # equal to plain DDP on each rank, where head.bias differs between the ranks
        assert r['bit_equal'] and r['loss_diff'] == 0.0, r
    assert len({r['digest'] for r in rows}) == 2
