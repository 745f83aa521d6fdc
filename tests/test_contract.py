"""The contract, through a real Runner on 2 and 3 gloo ranks (cases in tests/contract_cases.py).

For every case: replicas bit-identical, and the loss curve and final parameters equal to plain DDP's
(``find_unused_parameters=True``, or ``False`` where ``True`` cannot run) after 100 iterations with
a val loop every 4: bit for bit on 2 ranks, within 1e-6 on 3. Where usage never changed, the fast
plan is still in force at the end; where it changed, the plan was left once, for the reason the case
is about.
"""
import pytest
import torch

from mmddp_hooks.compat import COMPILE_MIN, torch_release
from mmddp_hooks.ranks import run_distributed, run_on_ranks

import contract_cases
import scenarios
from contract_cases import CASES, ITERS, LATE, OFF

pytestmark = [pytest.mark.dist, pytest.mark.runner]

TOLERANCE = 1e-6
KEEPS_PLAN = {'called_but_unused': ['stage4.0.weight', 'stage4.0.bias'],
              'predict_only_head': ['refine_head.weight', 'refine_head.bias'],
              'rank_fixed': [], 'reentrant_checkpoint': []}
LEAVES_PLAN = {'late_module': f'{LATE} (distill.weight, distill.bias); their gradients were '
                              'averaged by hand in the same step',
               'late_param': f'{LATE} (temperature)',
               'switched_off': f'2 {OFF} (warmup.weight, warmup.bias); their gradients stay None',
               'amp_bf16': f'{LATE} (distill.weight, distill.bias)',
               'grad_clip': f'2 {OFF} (warmup.weight, warmup.bias)',
               'two_param_groups': f'{LATE} (distill.weight, distill.bias)'}


@pytest.fixture(scope='module', params=[2, 3], ids=lambda n: f'{n}ranks')
def contract(request):
    ranks = run_distributed(contract_cases.run_contract, request.param, args=(list(CASES),),
                            timeout=600)
    return request.param, ranks


@pytest.mark.parametrize('name', list(CASES))
def test_trains_as_plain_ddp(contract, name):
    world_size, ranks = contract
    rows = [r[name] for r in ranks]
    scenarios.assert_trains_alike(rows, world_size, ITERS, TOLERANCE)
    plan, current, switches = rows[0]['plan'], rows[0]['current'], rows[0]['switch_log']
    if name in KEEPS_PLAN:
        assert not plan['find_unused_parameters'] and plan['ignore'] == KEEPS_PLAN[name]
        assert current['find_unused'] is False and switches == [], switches
    if name in LEAVES_PLAN:
        assert not plan['find_unused_parameters'] and current['find_unused'] is True
        assert len(switches) == 1 and LEAVES_PLAN[name] in switches[0], switches
    if name == 'rank_fixed':
        assert plan['fill'] == {str(r): ['rank1_adapter.weight', 'rank1_adapter.bias']
                                for r in range(world_size) if r != 1}
    if name == 'reentrant_checkpoint':  # the config asked True, which cannot run here
        assert plan['reentrant_checkpoint'] and any('marked as ready twice' in x
                                                    for x in plan['reasons'])
    if name == 'grad_accumulation':
        assert plan['find_unused_parameters'] and 'accumulated' in plan['reasons'][1]


def test_reentrant_checkpointing_crashes_plain_find_unused_true():
    """The reference of the reentrant case is False because True cannot run: shown, not assumed."""
    result = run_on_ranks(scenarios.train_plain, 2, args=('ReentrantCheckpoint',),
                          kwargs=dict(find_unused=True, iters=3), timeout=120, failure_grace=3)
    assert not result.ok
    assert 'marked as ready twice' in '\n'.join(r.error or '' for r in result.ranks)


def test_compiled_train_step_trains_as_plain_ddp_through_a_wake_up_and_two_freezes():
    """MMEngine's compile=True compiles the wrapper's train_step: the model's forward and backward
    are compiled, the probe, guard, plan switch, trainable-set following and their collectives
    never are (#37: traced, mmengine.dist.all_gather_object crashed both ranks at the wake-up).
    Before torch COMPILE_MIN (2.1.2 and 2.2.2 raised InternalTorchDynamoError, 2.3.1 did not retrace
    the woken branch) the hook refuses it, naming both versions."""
    if torch_release() < COMPILE_MIN:
        result = run_on_ranks(contract_cases.run_compiled, 2, timeout=300, failure_grace=30)
        for r in result.ranks:
            assert (f'needs torch >= {COMPILE_MIN[0]}.{COMPILE_MIN[1]} with DDPAutoTuneHook, but '
                    f'torch {torch.__version__} is installed') in (r.error or ''), result.describe()
        return
    rows = run_distributed(contract_cases.run_compiled, 2, timeout=300)
    scenarios.assert_trains_alike(rows, 2, ITERS, 0.0)
    for row in rows:
        assert row['model'] == ['SwitchedOn.forward'], row['model']
        assert set(row['ours']) <= contract_cases.TRACED, row['ours']
        assert len(row['switch_log']) == 1 and LATE in row['switch_log'][0], row['switch_log']
        assert [x.split(': ', 1)[1] for x in row['trainable_log']] == [
            'froze 2 params (trunk.0.weight, trunk.0.bias)',
            'froze 2 params (trunk.2.weight, trunk.2.bias)'], row['trainable_log']
        assert row['current']['find_unused'] is True


def test_sync_bn_config_trains_as_plain_ddp():
    """sync_bn='torch' through the Runner, with a BatchNorm model whose branch wakes up after the
    probe. SyncBatchNorm runs on a GPU only: here the wrapper reverts it, as the plain reference's
    model never had it (tests/test_gpu.py runs it synchronised, on two ranks sharing the GPU)."""
    rows = run_distributed(contract_cases.run_sync_bn, 2, timeout=300)
    for row in rows:  # each rank's running statistics are its own, as under plain DDP
        assert row['bit_equal'] and row['loss_diff'] == 0.0 and row['losses'] == ITERS, row
        # the Runner converted to SyncBatchNorm, the wrapper reverted it (MMEngine's _BatchNormXd)
        assert '_BatchNormXd' in row['layers'] and 'SyncBatchNorm' not in row['layers'], row
        assert 'BatchNorm1d' in row['reference_layers'], row
        assert len(row['switch_log']) == 1 and LATE in row['switch_log'][0], row['switch_log']


def test_amp_accumulation_through_train_step_with_the_guard_live():
    """AmpOptimWrapper with accumulative_counts=3, driven through train_step by hand: the guard
    runs on every window's synchronising backward (read by hooks: .grad is already set there) until
    the branch wakes up inside a window; equal to plain DDP bit for bit. CPU autocast: bf16 (MMEngine
    refuses fp16 there), without GradScaler (it needs CUDA); tests/test_gpu.py runs fp16 with it."""
    rows = run_distributed(contract_cases.amp_accumulation, 2, args=('bfloat16',), timeout=120)
    assert len({r['digest'] for r in rows}) == 1, 'replicas diverged'
    for r in rows:
        assert r['losses'] == r['plain_losses'] and r['bit_equal'], r
        # armed until the window holding the wake-up synchronises (iteration AMP_WAKE + 1)
        assert r['guarded'] == list(range(contract_cases.AMP_WAKE + 1)), r['guarded']
        assert len(r['switch_log']) == 1 and LATE in r['switch_log'][0], r['switch_log']
        assert r['scale'] == r['plain_scale'] == 1.0
