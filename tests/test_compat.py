"""What differs between torch releases is adapted in mmddp_hooks.compat, and nowhere else."""
import ast
import datetime
import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from mmddp_hooks.compat import check_torch, torch_release
from mmddp_hooks.ranks import run_distributed

ROOT = Path(__file__).parents[1]
OURS = r'mmddp_hooks(\.|$)'  # a warning raised from this package's code: an error below


@pytest.mark.parametrize('version, ok', [('2.0.1', False), ('2.1.2+cu121', True),
                                         ('2.13.0+cpu', True), ('2.15.0', True),
                                         ('2.16.0', False)])
def test_supported_range_is_checked_and_named(version, ok):
    if ok:
        check_torch(version)
    else:
        with pytest.raises(ImportError, match=r'supports torch 2\.1 to 2\.15\.x, but torch '):
            check_torch(version)
    assert torch_release(version) == tuple(int(x) for x in version.split('+')[0].split('.')[:2])


def test_no_version_check_outside_compat():
    offenders = []
    for f in sorted((ROOT / 'mmddp_hooks').rglob('*.py')):
        if f.name in ('compat.py', 'version.py'):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == '__version__' and \
                    ast.unparse(node.value) == 'torch':
                offenders.append(f'{f.relative_to(ROOT)}:{node.lineno}')
    # naming the running torch in a message is fine; deciding on it is compat's job
    assert offenders == ['mmddp_hooks/hooks/dist_debug_level_hook.py:36'], offenders


def comm_hook_survives_rebuilds():
    from mmddp_hooks.plan import DDPPlan
    from mmddp_hooks.wrapper import ReconfigurableDDP

    calls = []

    def counting_hook(state, bucket):
        calls.append(state)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())  # a no-op reduction: enough to see it run
        return fut

    class TwoOfThree(nn.Sequential):
        def forward(self, x):
            return self[1](self[0](x))  # self[2] never used

    # every DDP argument of the config reaches each rebuild, also those newer releases added
    given = []
    ddp_init = nn.parallel.DistributedDataParallel.__init__

    def spy(self, *args, **kwargs):
        given.append(kwargs)
        ddp_init(self, *args, **kwargs)

    nn.parallel.DistributedDataParallel.__init__ = spy
    accepted = inspect.signature(ddp_init).parameters
    extra = dict(bucket_cap_mb=1, check_reduction=False)  # check_reduction: in every release
    if 'init_sync' in accepted:
        extra['init_sync'] = True
    # valid only for a usage that never changes: not passed on (it is what the plan measures)
    skip = {'skip_all_reduce_unused_params': True} if 'skip_all_reduce_unused_params' in accepted \
        else {}

    torch.manual_seed(0)
    model = TwoOfThree(nn.Linear(4, 4), nn.Linear(4, 1), nn.Linear(4, 1))
    model._ddp_params_and_buffers_to_ignore = ['0.bias']  # the user's own: kept through plans
    ddp = ReconfigurableDDP(model, **extra, **skip)
    ddp.register_comm_hook('mine', counting_hook)
    seen = []
    ddp.rebuild(find_unused_parameters=False, ignore=['2.weight', '2.bias'])
    for plan in (None, DDPPlan(False, ignore=['2.weight', '2.bias']), DDPPlan(True)):
        if plan is not None:
            ddp.apply_plan(plan)
        loss = ddp(torch.randn(2, 4)).sum()
        ddp.before_backward(loss)
        loss.backward()
        ddp.after_backward()
        ddp.module.zero_grad(set_to_none=True)
        seen.append(len(calls))
        calls.clear()
        assert '0.bias' in ddp.module._ddp_params_and_buffers_to_ignore, plan
    ddp.close_guard()
    assert len(given) == 4 and all(kw.items() >= extra.items() for kw in given), (extra, given)
    assert not any(k in kw for kw in given for k in skip), given
    return seen


@pytest.mark.dist
def test_comm_hooks_are_registered_again_after_every_rebuild():
    for seen in run_distributed(comm_hook_survives_rebuilds, 2, timeout=120):
        assert len(seen) == 3 and all(n >= 1 for n in seen), seen


@pytest.mark.parametrize('key', ['delay_all_reduce_named_params', 'param_to_hook_all_reduce',
                                 'mixed_precision'])
def test_ddp_arguments_a_rebuild_cannot_honour_are_refused_by_name(key):
    from mmddp_hooks.wrapper import ReconfigurableDDP

    with pytest.raises(ValueError, match=f"model_wrapper_cfg sets \\['{key}'\\].*Remove them"):
        ReconfigurableDDP(nn.Linear(2, 2), **{key: object()})


def trains_with_our_warnings_as_errors():
    """A Runner with DDPAutoTuneHook and HangWatchdogHook through a usage change (an ignored branch
    wakes up on rank 1: the guard's fix, a rebuild), and plain DDP after it, any warning raised
    from this package's code an error."""
    import scenarios

    warnings.filterwarnings('error', module=OURS)
    watchdog = dict(type='HangWatchdogHook', timeout=60, action='abort')
    tuned = scenarios.train_plain('WakesUpOnRank1', iters=8, hook=dict(probe_iters=2),
                                  extra_hooks=[watchdog])
    return len(tuned['losses'])


@pytest.mark.dist
def test_nothing_warns_from_our_code_on_two_ranks():
    """torch >= 2.14 deprecates _set_pg_timeout with a FutureWarning on every rank: set_timeout
    is used where it exists."""
    assert run_distributed(trains_with_our_warnings_as_errors, 2, timeout=180) == [8, 8]


def test_a_deprecated_torch_call_from_our_code_is_an_error_under_the_filter(monkeypatch):
    """The filter of the test above catches what it must: a torch function deprecated as torch
    does it (a FutureWarning with stacklevel=2, so it names its caller), called by our code."""
    from torch.distributed import distributed_c10d

    from mmddp_hooks.compat import set_group_timeout

    def deprecated(timeout, group=None):
        warnings.warn('`_set_pg_timeout` is deprecated, please use `set_timeout` instead',
                      FutureWarning, stacklevel=2)

    monkeypatch.delattr(torch.distributed, 'set_timeout', raising=False)  # as before 2.14
    monkeypatch.setattr(distributed_c10d, '_set_pg_timeout', deprecated, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        warnings.filterwarnings('error', module=OURS)
        with pytest.raises(FutureWarning, match='_set_pg_timeout'):
            set_group_timeout(None, datetime.timedelta(seconds=1))


def test_the_public_set_timeout_is_used_where_torch_has_it(monkeypatch):
    from torch.distributed import distributed_c10d

    from mmddp_hooks.compat import set_group_timeout

    calls = []
    monkeypatch.setattr(torch.distributed, 'set_timeout', lambda *a: calls.append(a), raising=False)
    monkeypatch.setattr(distributed_c10d, '_set_pg_timeout', None, raising=False)  # not called
    assert set_group_timeout('group', datetime.timedelta(seconds=5)) is True
    assert calls == [(datetime.timedelta(seconds=5), 'group')]
    monkeypatch.delattr(torch.distributed, 'set_timeout')
    monkeypatch.delattr(distributed_c10d, '_set_pg_timeout', raising=False)
    assert set_group_timeout('group', datetime.timedelta(seconds=5)) is False  # torch 2.1


@pytest.mark.parametrize('version, compile_cfg, refused', [
    ('2.1.2+cu121', True, True), ('2.1.2', dict(backend='eager'), True), ('2.1.2', False, False),
    ('2.1.2', None, False), ('2.3.1', True, True), ('2.4.1', True, False), ('2.15.0', True, False)])
def test_compile_is_refused_before_torch_2_4_naming_the_versions(version, compile_cfg, refused):
    from mmddp_hooks.compat import check_compile

    if not refused:
        check_compile(compile_cfg, version)
        return
    with pytest.raises(RuntimeError, match=rf'compile=.* needs torch >= 2\.4 with DDPAutoTuneHook, '
                                           rf'but torch {re.escape(version)} is installed'):
        check_compile(compile_cfg, version)
