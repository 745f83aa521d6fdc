"""Collectives: only in mmddp_hooks/dist/, control traffic on gloo CPU, data on the wrapper's group.

NCCL serves CUDA tensors only. A default group made with ``init_process_group('cuda:gloo')`` has the
same rule on a CPU machine: a CPU tensor on it raises "No backend type associated with device type
cpu". The guard, probe and object exchanges must work on such a group.
"""
import ast
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from mmddp_hooks.ranks import run_distributed

ROOT = Path(__file__).parents[1]
COLLECTIVES = {
    'all_reduce', 'all_gather', 'all_gather_object', 'all_gather_into_tensor', 'reduce_scatter',
    'reduce_scatter_tensor', 'broadcast', 'broadcast_object_list', 'barrier', 'monitored_barrier',
    'reduce', 'gather', 'gather_object', 'scatter', 'scatter_object_list', 'send', 'recv', 'isend',
    'irecv', 'all_to_all', 'all_to_all_single', 'batch_isend_irecv', 'new_group', 'collect_results',
    'broadcast_object', 'all_reduce_dict', 'all_reduce_params', 'sync_random_seed'}
DIST_MODULES = {'torch.distributed', 'mmengine.dist'}


def direct_collectives(source: str):
    """(line, call) for each torch.distributed / mmengine.dist collective called in ``source``."""
    tree = ast.parse(source)
    aliases = {}  # local name -> module it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in DIST_MODULES:
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f'{node.module}.{a.name}'
                if full in DIST_MODULES:
                    aliases[a.asname or a.name] = full
                elif node.module in DIST_MODULES and a.name in COLLECTIVES:
                    found.append((node.lineno, f'from {node.module} import {a.name}'))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if aliases.get(owner, owner) in DIST_MODULES:
                found.append((node.lineno, ast.unparse(node.func)))
    return found


def test_the_scanner_finds_direct_collectives():
    source = ('import torch.distributed as tdist\nimport torch\nfrom torch import distributed\n'
              'from mmengine import dist as md\nfrom torch.distributed import barrier\n'
              'tdist.all_reduce(x)\ntorch.distributed.all_gather_object(a, b)\n'
              'distributed.broadcast(x, 0)\nmd.all_gather_object(x)\nother.all_reduce(x)\n')
    assert sorted(call for _, call in direct_collectives(source)) == [
        'distributed.broadcast', 'from torch.distributed import barrier', 'md.all_gather_object',
        'tdist.all_reduce', 'torch.distributed.all_gather_object']


def test_no_collective_outside_the_dist_package():
    files = sorted((ROOT / 'mmddp_hooks').rglob('*.py')) + sorted((ROOT / 'tools').glob('*.py')) + \
        sorted((ROOT / 'benchmarks').glob('*.py'))
    assert len(files) > 20
    offenders = [f'{f.relative_to(ROOT)}:{line}: {call}'
                 for f in files if ROOT / 'mmddp_hooks' / 'dist' not in f.parents
                 for line, call in direct_collectives(f.read_text())]
    assert not offenders, 'collectives belong in mmddp_hooks/dist/:\n' + '\n'.join(offenders)


def _init_cuda_only_gloo():
    import torch.distributed as dist

    dist.init_process_group('cuda:gloo', rank=int(os.environ['RANK']),
                            world_size=int(os.environ['WORLD_SIZE']))


def control_plane_on_a_cuda_only_group():
    """On a group that refuses CPU tensors (as NCCL does), every control-plane path still works."""
    import torch.distributed as dist

    from mmddp_hooks import dist as ddist
    from mmddp_hooks.guard import PlanGuard
    from mmddp_hooks.probe import UsageProbe

    _init_cuda_only_gloo()
    try:
        dist.all_reduce(torch.zeros(1, dtype=torch.int32))  # what the guard used to do
        refused = ''
    except RuntimeError as e:
        refused = str(e)
    rank = dist.get_rank()

    class Finalized:  # a reducer whose iteration finished
        def _check_reducer_finalized(self):
            pass

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    probe = UsageProbe(model)
    loss = model(torch.randn(2, 4)).sum()
    probe.before_backward(loss)
    loss.backward()
    probe.after_backward(Finalized())
    probe.close()
    usage = probe.gather()

    model.zero_grad(set_to_none=True)
    model._ddp_params_and_buffers_to_ignore = ['1.bias']  # as the plan's rebuild sets it
    guard = PlanGuard(model, fill=[], ignore=['1.bias'])
    switches = []
    for _ in range(3):  # the used parameters' counts, and an ignored one that stays asleep
        loss = model[0](torch.randn(2, 4)).sum() + model[1].weight.sum()
        guard.before_backward(loss)
        loss.backward()
        switches.append(guard.after_backward(Finalized()))
    guard.close()
    out = dict(refused=refused, used=usage.used.tolist(), switches=switches,
               objects=ddist.all_gather_object(rank), counts=ddist.row_counts(rank + 3))
    ddist.barrier()
    return out


@pytest.mark.dist
def test_control_plane_runs_on_a_group_that_refuses_cpu_tensors():
    results = run_distributed(control_plane_on_a_cuda_only_group, 2, init_process_group=False,
                              timeout=120)
    for r in results:
        assert 'No backend type associated with device type cpu' in r['refused']
        assert r['used'] == [[[True] * 4], [[True] * 4]]
        assert r['switches'] == [None] * 3
        assert r['objects'] == [0, 1] and r['counts'] == [3, 4]


def test_control_flags_must_be_cpu_tensors():
    from mmddp_hooks import dist as ddist

    with pytest.raises(ValueError, match='control flags must be CPU tensors'):
        ddist.all_reduce_flags(torch.zeros(1, device='meta'))


def control_plane_with_a_wrong_interface():
    """GLOO_SOCKET_IFNAME names no interface of this node: wrapping fails at once, naming it."""
    from mmddp_hooks.wrapper import ReconfigurableDDP

    os.environ['GLOO_SOCKET_IFNAME'] = 'nosuchnic0'
    try:
        ReconfigurableDDP(nn.Linear(4, 1))
    except RuntimeError as e:
        return str(e)
    finally:
        del os.environ['GLOO_SOCKET_IFNAME']
    return 'wrapped'


@pytest.mark.dist
def test_a_control_plane_that_cannot_connect_fails_at_wrap_time_naming_gloo_socket_ifname():
    for error in run_distributed(control_plane_with_a_wrong_interface, 2, timeout=120):
        assert 'could not connect the gloo control plane' in error
        assert 'Unable to find address for: nosuchnic0' in error
        assert 'GLOO_SOCKET_IFNAME=nosuchnic0. On every node set GLOO_SOCKET_IFNAME' in error
        assert 'This node has: lo' in error


class _Calls:
    """A store that records each call made through it (``bindings='no_check'``: without ``check``,
    as torch 2.1's bindings show a store)."""

    def __init__(self, kv, bindings: str) -> None:
        self.calls = []
        for name in ('wait', 'get') + (('check',) if bindings == 'check' else ()):
            setattr(self, name, self._recorded(name, getattr(kv, name)))

    def _recorded(self, name, method):
        def call(*args):
            self.calls.append((name, *args))
            return method(*args)
        return call


@pytest.mark.parametrize('bindings', ['check', 'no_check'])
@pytest.mark.parametrize('kind', ['tcp', 'hash', 'file'])
def test_store_get_tells_a_missing_key_from_a_present_one(kind, bindings, tmp_path):
    """The watchdog's reads (another rank's heartbeat, stack, the report) must never take a key that
    is there for one that is not (torch 2.1's 1 ms wait did on a loaded machine), nor wait for a
    missing one longer than the 100 ms torch 2.1's path asks: the calls made are counted."""
    import datetime

    import torch.distributed as dist

    from mmddp_hooks.compat import store_get
    from mmddp_hooks.ranks import free_port

    if kind == 'tcp':
        base = dist.TCPStore('127.0.0.1', free_port(), 1, True, timeout=datetime.timedelta(seconds=10))
    else:
        base = dist.HashStore() if kind == 'hash' else dist.FileStore(str(tmp_path / 'store'), 1)
    kv = dist.PrefixStore('mmddp_hooks/test', base)
    if bindings == 'check' and not hasattr(kv, 'check'):
        pytest.skip('this torch has no Store.check')
    kv = _Calls(kv, bindings)
    base.set('mmddp_hooks/test/there', b'{"beat": 1}')
    base.set('mmddp_hooks/test/empty', b'')
    keys = base.num_keys()
    assert store_get(kv, 'absent') is None
    assert store_get(kv, 'there') == b'{"beat": 1}' and store_get(kv, 'empty') == b''
    # one round trip to learn a key is missing (or one wait of 100 ms), one more to read it
    if bindings == 'check':
        assert kv.calls == [('check', ['absent']), ('check', ['there']), ('get', 'there'),
                            ('check', ['empty']), ('get', 'empty')], kv.calls
    else:
        wait = datetime.timedelta(milliseconds=100)
        assert kv.calls == [('wait', ['absent'], wait), ('wait', ['there'], wait), ('get', 'there'),
                            ('wait', ['empty'], wait), ('get', 'empty')], kv.calls
    assert base.num_keys() == keys  # the miss created no key
    base.set('mmddp_hooks/test/absent', b'late')
    assert store_get(kv, 'absent') == b'late'
