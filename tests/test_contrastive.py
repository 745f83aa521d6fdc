"""N ranks x batch b must equal 1 process x batch N*b: loss and every gradient, exactly."""
from pathlib import Path

import pytest
import torch

from mmddp_hooks.contrastive import GlobalInBatchInfoNCE
from mmddp_hooks.dist import gather_with_grad
from mmddp_hooks.ranks import run_distributed

import contrastive_cases as cases

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.dist
@pytest.mark.parametrize('sizes', [[3, 3], [3, 1, 2], [2, 2, 2], [4, 1]])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_global_infonce_equals_single_process(sizes, dtype):
    kw = dict(dtype=dtype, symmetric=len(sizes) == 3, masked=sizes == [3, 1, 2])
    ranks = run_distributed(cases.step, len(sizes), args=(sizes,), kwargs=kw, timeout=120)
    ref = cases.step(sizes, **kw)
    for r in ranks:
        assert abs(r['loss'] - ref['loss']) <= TOL[dtype] * max(1, abs(ref['loss']))
        assert _max_diff(r['grads'], ref['grads']) <= TOL[dtype], r['grads']
    assert 'criterion.log_inv_temperature' in ref['grads']  # the learnable temperature is compared


@pytest.mark.dist
@pytest.mark.parametrize('negatives', ['global', 'explicit'])
def test_energy_score_function_and_explicit_negatives(negatives):
    kw = dict(score='energy', negatives=negatives)
    ranks = run_distributed(cases.step, 2, args=([3, 2],), kwargs=kw, timeout=120)
    ref = cases.step([3, 2], **kw)
    for r in ranks:
        assert abs(r['loss'] - ref['loss']) <= 1e-10
        assert _max_diff(r['grads'], ref['grads']) <= 1e-10


@pytest.mark.dist
def test_row_counts_are_exchanged_once_per_step_or_not_at_all():
    exchanged = run_distributed(cases.count_row_exchanges, 2, args=([3, 3], False), timeout=120)
    given = run_distributed(cases.count_row_exchanges, 2, args=([3, 3], True), timeout=120)
    ref = cases.step([3, 3], symmetric=True, masked=True)
    assert [r['exchanges'] for r in exchanged] == [1, 1]
    assert [r['exchanges'] for r in given] == [0, 0]
    for r in exchanged + given:
        assert abs(r['loss'] - ref['loss']) <= 1e-10
        assert _max_diff(r['grads'], ref['grads']) <= 1e-10


@pytest.mark.dist
def test_naive_gather_without_sum_is_wrong():
    ranks = run_distributed(cases.step_with_naive_gather, 2, args=([3, 3],), timeout=120)
    ref = cases.step([3, 3])
    assert abs(ranks[0]['loss'] - ref['loss']) <= 1e-10  # forward is right...
    assert _max_diff(ranks[0]['grads'], ref['grads']) > 1e-3  # ...the gradients are not


@pytest.mark.dist
def test_training_with_global_negatives_matches_big_batch_and_beats_local():
    dist_global = run_distributed(cases.train, 2, args=([3, 3],), timeout=180)[0]
    dist_local = run_distributed(cases.train, 2, args=([3, 3], 'local'), timeout=180)[0]
    single = cases.train([6])
    assert dist_global['eval_loss'] == pytest.approx(single['eval_loss'], rel=1e-8)
    assert dist_local['eval_loss'] > dist_global['eval_loss'] + 0.1, (dist_local, dist_global)


def test_without_process_group_gather_is_identity():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x


@pytest.mark.parametrize('kwargs, match', [
    (dict(negatives='hard'), 'negatives must be one of'),
    (dict(temperature=0), 'temperature must be > 0'),
    (dict(log_key='loss_global'), "contains 'loss'"),
    (dict(symmetric=True, negatives='explicit'), 'symmetric=True needs in-batch'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GlobalInBatchInfoNCE(**kwargs)


def test_fp16_inputs_give_float32_logits():
    loss = GlobalInBatchInfoNCE()(torch.randn(4, 3).half(), torch.randn(4, 3).half())
    assert loss['loss_infonce'].dtype == torch.float32


@pytest.mark.dist
def test_example_config_trains_through_the_runner(tmp_path):
    config = str(Path(__file__).parents[1] / 'configs' / 'examples' / 'two_tower_infonce.py')
    ranks = run_distributed(cases.train_example_config, 2, args=(config, str(tmp_path)),
                            timeout=180)
    for r in ranks:
        assert len(r['values']) == 60
        assert r['values'] == ranks[0]['values']  # the logged value is the all-reduced one
        assert sum(r['values'][-10:]) / 10 < 0.7 * sum(r['values'][:10]) / 10
        assert r['plan'] == 'find_unused_parameters=False'
    assert ranks[0]['temperature'] == ranks[1]['temperature']
