"""DDPAutoTuneHook through a real MMEngine Runner on 2 and 3 gloo ranks.

Each scenario trains with the hook and again with find_unused_parameters=True (no hook) from the same
seeds, in the same ranks: replicas must end bit-identical, the plan must be the expected one, and the
loss curve and parameters must match the find_unused_parameters=True run.
"""

import pytest

from mmddp_hooks.ranks import run_distributed, run_on_ranks

import scenarios

pytestmark = [pytest.mark.dist, pytest.mark.runner]

TIMEOUT = 240


def _run(model_name, world_size, hook=None, **kw):
    results = run_distributed(scenarios.compare_with_find_unused, world_size,
                              args=(model_name, hook or dict(probe_iters=4)), kwargs=kw,
                              timeout=TIMEOUT)
    digests = {r['tuned']['digest'] for r in results}
    assert len(digests) == 1, f'replicas diverged: {digests}'
    for r in results:
        assert r['tuned']['losses'] == pytest.approx(r['reference_losses'], rel=1e-5, abs=1e-6)
        assert r['max_param_diff'] < 1e-5
    return results


def _plan(results):
    plans = [r['tuned']['plan'] for r in results]
    assert all(p == plans[0] for p in plans), 'ranks disagree on the plan'
    return plans[0]


@pytest.mark.parametrize('world_size', [2, 3])
def test_no_unused_switches_find_unused_off(world_size):
    results = _run('AllUsed', world_size, config_find_unused=True)
    plan = _plan(results)
    assert plan['find_unused_parameters'] is False and not plan['ignore'] and not plan['fill']
    assert any('find_unused_parameters=True was not needed: no unused parameter in 4 iterations '
               f'on {world_size} ranks' in r for r in plan['reasons'])
    assert results[0]['tuned']['current']['find_unused'] is False


@pytest.mark.parametrize('world_size', [2, 3])
def test_disabled_distill_module_is_ignored(world_size):
    results = _run('DisabledDistill', world_size)
    plan = _plan(results)
    assert plan['find_unused_parameters'] is False and not plan['fill']
    assert plan['ignore'] == ['resolution_distill.0.weight', 'resolution_distill.0.bias',
                              'resolution_distill.1.weight', 'resolution_distill.1.bias']
    report = results[0]['tuned']['report']
    groups = [g for g in report['report']['groups'] if g['kind'] == 'never used']
    assert [(g['prefix'], len(g['names']), g['numel']) for g in groups] == [
        ('resolution_distill', 4, 2 * (8 * 8 + 8))]


def test_branch_used_on_one_rank_is_zero_filled():
    results = _run('RankOneBranch', 3)
    plan = _plan(results)
    assert plan['find_unused_parameters'] is False and not plan['ignore']
    assert plan['fill'] == {'0': ['rank1_adapter.weight', 'rank1_adapter.bias'],
                            '2': ['rank1_adapter.weight', 'rank1_adapter.bias']}


@pytest.mark.parametrize('model_name', ['ModalityDropout', 'GoalEncoders'])
def test_dynamic_usage_needs_find_unused(model_name):
    results = _run(model_name, 2)
    plan = _plan(results)
    assert plan['find_unused_parameters'] is True
    assert any('used in some iterations only' in r for r in plan['reasons'])


def test_tied_frozen_and_root_level_parameters():
    results = _run('TiedFrozenRoot', 2)
    plan = _plan(results)
    assert plan['find_unused_parameters'] is False
    assert sorted(plan['ignore']) == ['aux.bias', 'aux.weight', 'unused_scale']
    # a root-level parameter's key starts with '.', and a module registered twice is ignored
    # under every alias
    assert results[0]['tuned']['current']['ignored'] == [
        '.unused_scale', 'aux.bias', 'aux.weight', 'aux_alias.bias', 'aux_alias.weight']


@pytest.mark.parametrize('model_name, cause', [
    ('WakesUpOnRank1', 'rank 1: ignored parameters woke up (refine.weight, refine.bias); their '
                       'gradients were averaged by hand in the same step'),
    ('FallsAsleepOnRank0', 'rank 0: 2 parameters the plan counted on got no gradient '
                           '(adapter.weight, adapter.bias); rescued')])
def test_usage_change_after_probe_is_fixed_in_its_step_and_switched(model_name, cause):
    # momentum + weight decay: a wrong None/zero gradient would show in the parameters
    results = _run(model_name, 2, hook=dict(probe_iters=4),
                   optimizer=dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=1e-2))
    for r in results:
        assert r['tuned']['current']['find_unused'] is True
        assert len(r['tuned']['switch_log']) == 1 and cause in r['tuned']['switch_log'][0]


@pytest.mark.parametrize('model_name', ['DisabledDistill', 'RankOneBranch', 'ModalityDropout',
                                        'TiedFrozenRoot'])
def test_scenarios_crash_plain_ddp(model_name):
    """Without the hook, find_unused_parameters=False hits DDP's error: the scenarios are real."""
    result = run_on_ranks(scenarios.train_plain, 2, args=(model_name,), timeout=TIMEOUT,
                          failure_grace=3)
    assert not result.ok
    errors = '\n'.join(r.error or '' for r in result.ranks)
    assert 'Expected to have finished reduction in the prior iteration' in errors


def test_resume_keeps_plan_and_matches_uninterrupted_run():
    results = run_distributed(scenarios.resume_keeps_plan, 2, args=('DisabledDistill',
                                                                    dict(probe_iters=3)),
                              timeout=TIMEOUT)
    for r in results:
        assert r['first_plan']['ignore'] and r['checkpoint_plan'] == r['first_plan']
        assert r['resumed_plan'] == r['first_plan'] and not r['resumed_probed']
        assert r['resumed_losses'] == pytest.approx(r['straight_losses'], rel=1e-5)
        assert r['resumed_digest'] == r['straight_digest']
        assert r['ema_saved']
    assert len({r['resumed_digest'] for r in results}) == 1


def test_saved_plan_is_applied_on_resume_of_the_same_world_size_only(tmp_path):
    kw = dict(hook=dict(probe_iters=2), work_dir=str(tmp_path))
    first = run_distributed(scenarios.train_plain, 2, args=('DisabledDistill',), timeout=TIMEOUT,
                            kwargs=dict(kw, iters=4, checkpoint_interval=4))[0]
    assert first['probed'] and first['plan']['ignore']
    fine_tune = run_distributed(scenarios.train_plain, 2, args=('DisabledDistill',),
                                kwargs=dict(hook=kw['hook'], iters=3,
                                            load_from=str(tmp_path / 'iter_4.pth')),
                                timeout=TIMEOUT)[0]
    assert fine_tune['probed']  # load_from is a new run: the checkpoint's plan is not applied
    grown = run_distributed(scenarios.train_plain, 3, args=('DisabledDistill',), timeout=TIMEOUT,
                            kwargs=dict(kw, iters=6, resume=True))[0]
    assert grown['probed'] and grown['plan']['ignore'] == first['plan']['ignore']
    same = run_distributed(scenarios.train_plain, 2, args=('DisabledDistill',), timeout=TIMEOUT,
                           kwargs=dict(kw, iters=5, resume=True,
                                       load_from=str(tmp_path / 'iter_4.pth')))[0]
    assert not same['probed'] and same['plan'] == first['plan']


def test_hand_wrapped_ddp_is_rewrapped():
    results = run_distributed(scenarios.train_plain, 2, args=('DisabledDistill',),
                              kwargs=dict(hook=dict(probe_iters=2), prewrap=True, iters=5),
                              timeout=TIMEOUT)
    for r in results:
        assert r['wrapper_type'] == 'ReconfigurableDDP'
        assert r['plan']['ignore'] == ['resolution_distill.0.weight', 'resolution_distill.0.bias',
                                       'resolution_distill.1.weight', 'resolution_distill.1.bias']
    assert results[0]['digest'] == results[1]['digest']
