"""CUDA tier (`make test-gpu`): skipped, and reported as skipped, on a machine without CUDA.

a. every plan path through a real Runner under NCCL with world size 1: each collective is then a
   real NCCL call under NCCL's device rules (a CPU tensor on the NCCL group raises);
b. two ranks sharing the GPU over gloo with CUDA tensors, for the paths that need several ranks;
c. the mmseg launcher on the GPU;
d. GlobalInBatchInfoNCE on CUDA under fp16/bf16 autocast, with host syncs turned into errors;
e. trainable-set changes (freeze/unfreeze) against their reference, NCCL world size 1 and 2 gloo
   ranks sharing the GPU;
f. a hang under NCCL, reported with the flight-recorder dump the watchdog wrote;
g. what users switch on with it, against plain DDP: SyncBN (``sync_bn='torch'``), fp16
   AmpOptimWrapper (GradScaler) with accumulation, ``compile=True`` (inductor) through a usage
   change; and the peak GPU memory of a rebuild. The same case functions run on CPU in
   tests/test_contract.py and tests/test_rebuild_memory.py (BatchNorm reverted, bf16 without
   GradScaler, the aot_eager backend, peak RSS).
"""
import pickle
import re

import hang_cases
import pytest
import torch

from mmddp_hooks.ranks import run_distributed, run_on_ranks
from mmddp_hooks.watchdog import ABORT_EXIT_CODE

import contract_cases
import launch
import scenarios
import trainable_cases
from contract_cases import ITERS, LATE

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

TIMEOUT = 300
SGD_WD = dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=1e-2)


def _compare(model_name, world_size, backend, hook, iters=12):
    results = run_distributed(scenarios.compare_with_find_unused, world_size, backend=backend,
                              args=(model_name, hook), kwargs=dict(iters=iters, optimizer=SGD_WD),
                              timeout=TIMEOUT, local_devices=torch.cuda.device_count())
    assert len({r['tuned']['digest'] for r in results}) == 1, 'replicas diverged'
    for r in results:
        assert r['tuned']['losses'] == pytest.approx(r['reference_losses'], rel=1e-5, abs=1e-6)
        assert r['max_param_diff'] < 1e-5
    return results[0]['tuned']


@pytest.mark.dist
@pytest.mark.parametrize('model_name, hook, expect', [
    ('TiedFrozenRoot', dict(probe_iters=4), 'ignore'),      # root-level and aliased ignores
    ('DisabledDistill', dict(probe_iters=4), 'ignore'),     # a whole dead module
    ('FallsAsleepOnRank0', dict(probe_iters=4), 'switch'),  # rescue, None where no rank used it
])
def test_nccl_world_size_1_plan_paths(model_name, hook, expect):
    tuned = _compare(model_name, 1, 'nccl', hook)
    if expect == 'ignore':
        assert tuned['plan']['ignore'] and tuned['current']['find_unused'] is False
    else:
        assert tuned['current']['find_unused'] is True
        assert len(tuned['switch_log']) == 1 and 'got no gradient' in tuned['switch_log'][0]


@pytest.mark.dist
def test_nccl_world_size_1_resume_keeps_plan():
    r = run_distributed(scenarios.resume_keeps_plan, 1, backend='nccl', timeout=TIMEOUT,
                        args=('DisabledDistill', dict(probe_iters=3)))[0]
    assert r['resumed_plan'] == r['first_plan'] and not r['resumed_probed']
    assert r['resumed_digest'] == r['straight_digest']


def guard_steps_without_host_sync():
    """ReconfigurableDDP on the GPU under NCCL: the guard's work after backward never syncs."""
    from torch import nn

    from mmddp_hooks.plan import DDPPlan
    from mmddp_hooks.wrapper import ReconfigurableDDP

    class TwoOfThree(nn.Sequential):
        def forward(self, x):
            return self[1](self[0](x))  # self[2] never reaches the loss

    torch.manual_seed(0)
    model = TwoOfThree(nn.Linear(8, 8), nn.Linear(8, 1), nn.Linear(8, 1)).cuda()
    ddp = ReconfigurableDDP(model, device_ids=[torch.cuda.current_device()])
    out = {}
    for name, plan in (('ignore', DDPPlan(False, ignore=['2.weight', '2.bias'])),
                       ('rescue', DDPPlan(False))):  # 2.* is missing every step: rescued
        ddp.apply_plan(plan)
        switches = []
        for _ in range(6):
            loss = ddp(torch.randn(4, 8, device='cuda')).sum()  # through DDP's reducer
            ddp.before_backward(loss)
            torch.cuda.set_sync_debug_mode('error')  # the flag exchange starts inside backward
            try:
                loss.backward()
                switches.append(ddp.after_backward())
            finally:
                torch.cuda.set_sync_debug_mode('default')
            model.zero_grad(set_to_none=True)
        out[name] = switches
        ddp.close_guard()
    return out


@pytest.mark.dist
def test_guard_makes_no_host_sync_under_nccl():
    out = run_distributed(guard_steps_without_host_sync, 1, backend='nccl', timeout=TIMEOUT)[0]
    assert out['ignore'] == [None] * 6
    assert all('2 parameters got no gradient on any rank (2.weight, 2.bias)' in s
               for s in out['rescue'])


@pytest.mark.dist
@pytest.mark.parametrize('model_name, hook', [
    ('RankOneBranch', dict(probe_iters=4)),                        # rank-local zero-fill
    ('WakesUpOnRank1', dict(probe_iters=4)),                       # woken ignored parameter
    ('FallsAsleepOnRank0', dict(probe_iters=4)),                   # rescue and switch
])
def test_two_ranks_share_the_gpu_over_gloo(model_name, hook):
    tuned = _compare(model_name, 2, 'gloo', hook)
    if model_name == 'RankOneBranch':
        assert tuned['plan']['fill'] and tuned['current']['find_unused'] is False
    else:
        assert tuned['current']['find_unused'] is True and len(tuned['switch_log']) == 1


@pytest.mark.dist
@pytest.mark.parametrize('world_size, backend', [(1, 'nccl'), (2, 'gloo')])
def test_trainable_set_changes_on_the_gpu(world_size, backend):
    """Freeze/unfreeze against the reference (tests/trainable_cases.py) with CUDA tensors: the
    guard's exchange, the store exchange under find_unused_parameters=True, and real bf16 AMP."""
    names = ['both', 'find_unused_plan', 'amp_bf16', 'accumulation']
    ranks = run_distributed(trainable_cases.run_cases, world_size, backend=backend,
                            args=(names,), kwargs=dict(iters=70), timeout=TIMEOUT,
                            local_devices=torch.cuda.device_count())
    for name in names:
        rows = [r[name] for r in ranks]
        assert len({r['digest'] for r in rows}) == 1, 'replicas diverged'
        for r in rows:
            assert r['loss_diff'] <= 1e-5 and r['param_diff'] <= 1e-5, (name, r)
            assert len(r['trainable_log']) == 2 and r['switch_log'] == [], (name, r)


@pytest.mark.dist
@pytest.mark.mmseg
def test_dist_train_fcn_stage4_on_the_gpu(tmp_path):
    code, out = launch.dist_train('configs/mmseg/fcn_r18_stage4-unused.py', tmp_path, '--synthetic',
                                  64, 64, '--iters', 8, nproc=1)
    assert code == 0, out[-5000:]
    assert 'Iter(train) [8/8]' in out
    assert 'backbone.layer4' in (tmp_path / 'ddp_usage_report.json').read_text()


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_infonce_on_cuda_under_autocast_without_host_sync(dtype):
    from mmddp_hooks.contrastive import GlobalInBatchInfoNCE

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    mask = torch.rand(16, generator=g) > 0.2
    reference = GlobalInBatchInfoNCE(symmetric=True)(q, k, mask=mask)['loss_infonce']
    criterion = GlobalInBatchInfoNCE(symmetric=True, learnable_temperature=True).cuda()
    qc, kc, mc, eye = q.cuda().requires_grad_(), k.cuda(), mask.cuda(), torch.eye(32, device='cuda')
    torch.cuda.synchronize()  # the inputs' copies and fills are done before host syncs are errors
    torch.cuda.set_sync_debug_mode('error')
    try:
        with torch.autocast('cuda', dtype=dtype):
            loss = criterion(qc @ eye, kc, mask=mc)
        loss['loss_infonce'].backward()
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert loss['loss_infonce'].dtype == torch.float32
    assert torch.isfinite(qc.grad).all()
    assert abs(loss['loss_infonce'].item() - reference.item()) < 2e-2 * abs(reference.item())


@pytest.mark.dist
def test_a_hang_under_nccl_is_reported_with_the_flight_recorder_dump(tmp_path):
    """NCCL world size 1, rank 0 sleeps in forward at iteration 6: the watchdog's report names the
    line and the flight-recorder dump it wrote (TORCH_NCCL_TRACE_BUFFER_SIZE set, as
    tools/train.py --hang-timeout does), which holds the run's NCCL collectives. The run's
    work_dir is this test's folder: the run's own temporary folder is gone when it returns."""
    result = run_on_ranks(hang_cases.hang, 1, args=('SleepsInForwardAlone',), backend='nccl',
                          kwargs=dict(work_dir=str(tmp_path)), timeout=TIMEOUT, failure_grace=30,
                          local_devices=1, env=dict(TORCH_NCCL_TRACE_BUFFER_SIZE='2000'))
    assert not result.timed_out and result.ranks[0].exitcode == ABORT_EXIT_CODE, result.describe()
    out = result.ranks[0].output
    assert re.search(r'STRAGGLER: rank 0 is in train_step \(iteration 6\) at \S*hang_cases.py:\d+ '
                     r'in branch', out), out[-3000:]
    dump = re.search(r'NCCL flight recorder .*?: rank 0: (\S+\.pkl)', out)
    assert dump and dump.group(1).startswith(str(tmp_path)), out[-3000:]
    with open(dump.group(1), 'rb') as f:
        trace = pickle.load(f)
    assert trace.get('entries'), trace.keys()  # DDP's collectives of iterations 1 to 5


@pytest.mark.dist
def test_sync_bn_under_the_product_trains_as_plain_ddp():
    """sync_bn='torch' through the Runner on two ranks sharing the GPU over gloo (world size 1
    would skip SyncBatchNorm's all-gather), a branch waking up after the probe: SyncBatchNorm
    trains in both runs, and the replicas' running statistics stay identical."""
    rows = run_distributed(contract_cases.run_sync_bn, 2, backend='gloo', timeout=TIMEOUT,
                           local_devices=torch.cuda.device_count())
    assert len({r['digest'] for r in rows}) == 1, 'replicas diverged'
    for r in rows:
        assert r['losses'] == ITERS and r['loss_diff'] <= 1e-5 and r['param_diff'] <= 1e-5, r
        assert 'SyncBatchNorm' in r['layers'] and 'SyncBatchNorm' in r['reference_layers'], r
        assert len(r['switch_log']) == 1 and LATE in r['switch_log'][0], r['switch_log']


@pytest.mark.dist
@pytest.mark.parametrize('world_size, backend', [(1, 'nccl'), (2, 'gloo')])
def test_fp16_amp_accumulation_through_train_step_with_the_guard_live(world_size, backend):
    """AmpOptimWrapper(dtype='float16', accumulative_counts=3) driven through
    ReconfigurableDDP.train_step by hand, as MMEngine's own wrapper test does, the plan's guard
    armed until the branch wakes up inside a window: as plain DDP, GradScaler on."""
    rows = run_distributed(contract_cases.amp_accumulation, world_size, backend=backend,
                           args=('float16',), timeout=TIMEOUT,
                           local_devices=torch.cuda.device_count())
    assert len({r['digest'] for r in rows}) == 1, 'replicas diverged'
    for r in rows:
        assert r['losses'] == pytest.approx(r['plain_losses'], rel=1e-5, abs=1e-6), r
        assert r['param_diff'] <= 1e-5, r
        assert r['guarded'] == list(range(contract_cases.AMP_WAKE + 1)), r['guarded']
        assert len(r['switch_log']) == 1 and LATE in r['switch_log'][0], r['switch_log']
        assert r['scale'] == r['plain_scale'] > 1.0, r  # GradScaler was on, and agreed


@pytest.mark.dist
def test_compile_true_through_a_usage_change_trains_as_plain_ddp():
    """compile=True (inductor) under NCCL world size 1, a branch waking up after the probe and two
    freezes: bit for bit as plain MMDistributedDataParallel(find_unused_parameters=True) with
    compile=True, and no control function of the package compiled."""
    rows = run_distributed(contract_cases.run_compiled, 1, backend='nccl',
                           kwargs=dict(compile=True), timeout=TIMEOUT)
    scenarios.assert_trains_alike(rows, 1, ITERS, 0.0)
    r = rows[0]
    assert r['model'] == ['SwitchedOn.forward'] and set(r['ours']) <= contract_cases.TRACED, r
    assert len(r['switch_log']) == 1 and LATE in r['switch_log'][0], r['switch_log']
    assert len(r['trainable_log']) == 2 and r['current']['find_unused'] is True, r


@pytest.mark.dist
def test_a_rebuild_peaks_within_5_percent_of_steady_training_on_the_gpu():
    """torch.cuda.max_memory_allocated across plan changes of a 109 M parameter model, gradients as
    bucket views, NCCL world size 1 (tests/test_rebuild_memory.py measures RSS on CPU)."""
    from benchmarks.benchmark import rebuild_memory

    out = run_distributed(rebuild_memory, 1, backend='nccl', kwargs=dict(bucket_view=True),
                          timeout=TIMEOUT)[0]
    assert out['peak'] == 'torch.cuda.max_memory_allocated' and out['ratio'] <= 1.05, out
