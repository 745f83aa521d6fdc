"""One record of defined gradient arrival per backward (#41): the six cases where the readings
disagreed, each against plain DDP with ``find_unused_parameters=True`` on 2 gloo ranks: replicas
bit-identical, loss curve and final parameters bit for bit, and the same ``.grad is None`` set
before every optimizer step."""
import pytest

from mmddp_hooks.ranks import run_distributed

import arrival_cases
import scenarios
from arrival_cases import CASES, ITERS

pytestmark = [pytest.mark.dist, pytest.mark.runner]


@pytest.fixture(scope='module')
def arrival():
    return run_distributed(arrival_cases.run_arrival, 2, args=(list(CASES),), timeout=600)


@pytest.mark.parametrize('name', list(CASES))
def test_trains_as_plain_find_unused_true(arrival, name):
    rows = [r[name] for r in arrival]
    scenarios.assert_trains_alike(rows, 2, ITERS, 0.0)
    for r in rows:
        assert len(r['none_grads']) == ITERS
        assert r['none_grads'] == r['reference_none_grads'], (r['rank'], r['none_grads'],
                                                              r['reference_none_grads'])


def test_none_from_a_custom_function_leaves_the_head_none(arrival):
    """The case's point: from START on the head has no gradient anywhere, as True leaves it."""
    start = arrival_cases.NoneGradHead.START
    for r in (row['none_grad_after_probe'] for row in arrival):
        assert all('head.weight' not in s for s in r['none_grads'][:start])
        assert all({'head.weight', 'head.bias'} <= set(s) for s in r['none_grads'][start:])


def test_rank_fixed_usage_with_set_to_none_false_keeps_the_fast_plan(arrival):
    """zero_grad(set_to_none=False) does not turn a rank-fixed usage into a dynamic one."""
    for r in (row['set_to_none_false'] for row in arrival):
        plan = r['plan']
        assert plan['find_unused_parameters'] is False, plan
        assert plan['fill'] == {'0': ['rank1_adapter.weight', 'rank1_adapter.bias']}, plan


def test_a_reduction_the_rescue_cannot_complete_stops_every_rank_in_the_same_step():
    """Rank 1's reducer stays unfinished after the rescue: every rank raises in that step (the
    count travels in the exchange), so a rank that catches the error leaves no peer waiting."""
    rows = run_distributed(arrival_cases.unfinalized_on_one_rank, 2, timeout=120)
    by_rank = {r['rank']: r['raised'] for r in rows}
    assert 'could not complete this iteration although it fed zeros' in by_rank[1], by_rank
    assert '1 other rank(s) could not complete' in by_rank[0], by_rank
