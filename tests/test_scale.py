"""The control plane's cost per rank does not grow with the number of ranks (#36).

The guard's per-step exchange goes up and down a tree of the ranks (each rank talks to at most 5
others, a fixed number of bytes), the watchdog makes four store requests per rank and interval, a
store agreement six; counted through a proxy in front of the store (``tools/scale_sim.py --quick``).
"""
import datetime
import json
import os
import sys
import time

import pytest
import torch

from benchmarks.scale_sim import node_layout, predict
from benchmarks.store_proxy import StoreProxy
from mmddp_hooks.compat import store_wire_protocol_known
from mmddp_hooks.dist import tree_links
from mmddp_hooks.ranks import free_port, run_distributed

import launch


def _layout(sizes):
    keys, ranks, rank = [], [], 0
    for node, size in enumerate(sizes):
        for _ in range(size):
            keys.append(f'host/{node}')
            ranks.append(rank)
            rank += 1
    return keys, ranks


@pytest.mark.parametrize('sizes', [[1], [2], [4], [4, 4], [4, 4, 3], [8] * 16 + [5], [1] * 9,
                                   [3, 1, 4, 1, 5]])
def test_the_control_tree_spans_every_rank_with_few_links_and_log_depth(sizes):
    keys, ranks = _layout(sizes)
    links = {r: tree_links(keys, ranks, r) for r in ranks}
    roots = [r for r, (parent, _) in links.items() if parent is None]
    assert roots == [0]
    for r, (parent, children) in links.items():
        assert len(children) + (parent is not None) <= 5
        for c in children:
            assert links[c][0] == r  # a child's parent is this rank
    depth, level = 0, [0]
    seen = {0}
    while level:  # every rank reached once from the root, no cycle
        level = [c for r in level for c in links[r][1]]
        assert not seen & set(level)
        seen |= set(level)
        depth += bool(level)
    assert seen == set(ranks)
    bound = (max(sizes).bit_length() - 1) + (len(sizes).bit_length() - 1)
    assert depth <= bound, (depth, bound)


def test_nodes_of_the_simulation_and_the_model():
    assert node_layout(16, [4]) == [4, 4, 4, 4]
    assert node_layout(11, [4, 4, 3]) == [4, 4, 3]
    assert node_layout(6, [4]) == [4, 2]
    # the tree crosses 2 floor(log2) links per level; gloo's ring 2 (N - 1), between nodes
    assert predict(1024, 8, 0.01, 0.025)['tree_ms'] == pytest.approx(2 * (3 * 0.01 + 7 * 0.025))
    assert predict(1024, 8, 0.01, 0.025)['ring_ms'] == pytest.approx(2 * 1023 * 0.025)
    assert predict(12, 4, 1, 1, 1.0)['store_requests_per_rank_s'] == 4


PROXY_PARSES = pytest.mark.skipif(
    not store_wire_protocol_known(), reason=f'the store proxy parses the TCPStore requests of torch '
                                            f'>= 2.2, not those of torch {torch.__version__}')


@PROXY_PARSES
def test_the_store_proxy_counts_each_request_as_sent():
    master = torch.distributed.TCPStore('127.0.0.1', 0, None, True,
                                        timeout=datetime.timedelta(seconds=10),
                                        wait_for_workers=False)
    proxy = StoreProxy(master.port)
    try:
        client = torch.distributed.TCPStore('127.0.0.1', proxy.port, None, False,
                                            timeout=datetime.timedelta(seconds=10))
        client.set('scale/rank/7', b'xyz')
        assert client.get('scale/rank/7') == b'xyz'
        checks = hasattr(client, 'check')  # not in torch 2.1's bindings
        if checks:
            client.check(['a', 'b'])
        client.add('n', 3)
        client.multi_set(['k1', 'k2'], ['v1', 'v2'])
        client.delete_key('k1')
        client.append('k2', 'w')
        deadline = time.time() + 5
        while 'append' not in [r.kind for r in proxy.snapshot()[0]] and time.time() < deadline:
            time.sleep(0.05)
        kinds = [r.kind for r in proxy.snapshot()[0]]
        # a client says who it is, then: set, get (a wait and a get on the wire), check, add, ...
        pings = ['ping'] * (kinds[1:2] == ['ping'])  # torch >= 2.3 (or so) pings after validating
        assert kinds == ['validate', *pings, 'set', 'wait', 'get'] + ['check'] * checks + [
            'add', 'multi_set', 'delete_key', 'append'], kinds
        assert proxy.connection_of('scale/rank/') == {'7': 0} and not proxy.unparsed
        assert proxy.snapshot()[0][1 + len(pings)].nbytes == 1 + 8 + len('/scale/rank/7') + 8 + 3
    finally:
        proxy.close()


def tree_and_agreement_on_uneven_nodes():
    """3 ranks in 2 simulated nodes ({0, 1}, {2}): the tree's sums and maxima, and the store
    agreement: the same value, different values, a rank that never posts."""
    import torch.distributed as dist

    from mmddp_hooks import dist as ddist

    rank = dist.get_rank()
    os.environ['GROUP_RANK'] = str(0 if rank < 2 else 1)
    total = ddist.all_reduce_flags(torch.tensor([rank + 1, 10 * rank], dtype=torch.int32))
    top = ddist.all_reduce_flags(torch.tensor([rank, -rank], dtype=torch.int64),
                                 op=dist.ReduceOp.MAX)
    empty = ddist.all_reduce_flags(torch.zeros(0, dtype=torch.int32))
    tree = ddist.control_tree()
    same = ddist.store_agree('same', ('froze', ['a.weight']))
    differ = ddist.store_agree('differ', rank % 2)
    try:
        if rank != 1:
            ddist.store_agree('late', True, timeout_s=2)
        missing = None
    except ddist.StoreTimeout as e:
        missing = (e.missing, sorted(e.posted))
    ddist.barrier()
    # connected with a 60 s timeout, then given torch's default for its collectives
    timeout = ddist.control_group()._get_backend(torch.device('cpu')).options._timeout
    return dict(total=total.tolist(), top=top.tolist(), empty=empty.numel(), same=same,
                differ=differ, missing=missing, links=(tree.parent, tree.children),
                keys=tree.keys, timeout=timeout == dist.distributed_c10d.default_pg_timeout)


def beats_while_a_store_agreement_waits(timeout_s: float = 3.0, interval: float = 0.1) -> int:
    """Rank 1 waits in ``store_agree`` for rank 0, which never posts, with the hang watchdog on:
    the heartbeats rank 1's watcher posted meanwhile (it shares the store client)."""
    import tempfile

    import torch.distributed as dist

    from mmddp_hooks import dist as ddist
    from mmddp_hooks.hooks.hang_watchdog_hook import HangWatchdogHook

    hook = HangWatchdogHook(interval=interval)
    hook.start(tempfile.mkdtemp(prefix='mmddp_watch_'))
    before = hook.beats
    if dist.get_rank() == 1:
        with pytest.raises(ddist.StoreTimeout):
            ddist.store_agree('alone', True, timeout_s=timeout_s)
    beats = hook.beats - before
    ddist.barrier()
    hook.stop()
    return beats


@pytest.mark.dist
def test_the_watchdog_beats_while_its_rank_waits_in_a_store_agreement():
    """A rank waiting in store_agree (for up to trainable_change_timeout: 300 s) must still post
    heartbeats and its stack, or a hang report would call it unreachable instead of showing it."""
    beats = run_distributed(beats_while_a_store_agreement_waits, 2, timeout=60)[1]
    assert beats >= 10, beats  # about 30 at one beat every 0.1 s over 3 s


@pytest.mark.dist
def test_the_tree_reduces_and_the_store_agrees_on_uneven_nodes():
    rows = run_distributed(tree_and_agreement_on_uneven_nodes, 3, timeout=90)
    for r in rows:
        assert r['total'] == [6, 30] and r['top'] == [2, 0] and r['empty'] == 0
        assert r['same'] is None and r['differ'] == {0: 0, 1: 1, 2: 0} and r['timeout']
    assert [r['links'] for r in rows] == [(None, [1, 2]), (0, []), (0, [])]
    assert len(set(rows[0]['keys'])) == 2  # two nodes
    assert rows[0]['missing'] == ([1], [0, 2]) and rows[2]['missing'] == ([1], [0, 2])


# one srun task: the control tree as it is built under --launcher slurm
_SLURM_TASK = """import json, os
from mmddp_hooks import dist as ddist
ddist.init_dist_if_needed('gloo', launcher='slurm')
tree = ddist.control_tree()
with open(os.path.join(os.environ['TREE_OUT'], f'rank{ddist.get_rank()}.json'), 'w') as f:
    json.dump(dict(node=int(os.environ['SLURM_NODEID']), keys=tree.keys,
                   links=[tree.parent, tree.children]), f)
ddist.teardown()
"""


@pytest.mark.dist
@pytest.mark.parametrize('distribution, links', [
    ('block', [[None, [1, 2]], [0, []], [0, [3]], [2, []]]),  # nodes {0, 1} and {2, 3}
    ('cyclic', [[None, [2, 1]], [0, [3]], [0, []], [1, []]]),  # nodes {0, 2} and {1, 3}
])
def test_the_tree_s_nodes_are_slurm_s_nodes_whatever_the_task_distribution(distribution, links,
                                                                            tmp_path):
    """4 tasks on 2 pretend nodes of one host: a node's ranks are not consecutive under
    ``--distribution=cyclic``, so a rank minus its local id is no node's first rank."""
    fake_slurm = launch.ROOT / 'tests' / 'fake_slurm'
    code, out = launch.run(
        [str(fake_slurm / 'srun'), '-p', 'debug', '--job-name', 'tree', '--ntasks', '4',
         '--ntasks-per-node', '2', '--distribution', distribution, '--kill-on-bad-exit=1',
         sys.executable, '-c', _SLURM_TASK], timeout=120,
        PATH=f'{fake_slurm}:{os.environ["PATH"]}', MASTER_PORT=str(free_port()),
        PYTHONPATH=os.pathsep.join(p for p in sys.path if p), TREE_OUT=str(tmp_path))
    assert code == 0, out[-5000:]
    rows = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(4)]
    keys, nodes = rows[0]['keys'], [r['node'] for r in rows]
    assert all((keys[a] == keys[b]) == (nodes[a] == nodes[b]) for a in range(4) for b in range(4)), \
        (keys, nodes)
    assert [r['links'] for r in rows] == links


@pytest.mark.dist
@PROXY_PARSES
def test_quick_simulation_counts_a_flat_control_plane(tmp_path):
    """4 ranks in 2 nodes under the product (probe, guarded plan, watchdog at 0.2 s, one
    trainable-set change): what each rank adds, counted exactly."""
    out = tmp_path / 'quick.json'
    code, text = launch.run([sys.executable, 'tools/scale_sim.py', '--quick', '--out', str(out)],
                            timeout=180)
    assert code == 0, text[-5000:]
    run = json.loads(out.read_text())['measured'][0]
    assert run['ranks'] == 4 and run['nodes'] == [2, 2] and not run['unparsed']
    assert 'ignore 2 never-used params' in run['plan'] and 'zero-fill 4' in run['plan']
    assert any('froze 2 params (aux.weight, aux.bias)' in t for t in run['trainable_log'])
    assert not run['switch_log']
    # the watchdog: 4 requests per rank per heartbeat, whatever the number of ranks (counted in
    # the idle pause: a beat cut by its start or end moves a rank's count by under 3 requests)
    per_beat = run['store_requests_per_beat']
    assert 3.5 <= per_beat['min'] <= per_beat['max'] <= 4.5, per_beat
    # the guard: no collective per step, one int up and down the tree (2 + 2 ranks: ranks 0
    # and 2 talk to 2 others, ranks 1 and 3 to 1)
    step = run['per_step_per_rank']
    assert step['collectives']['max'] == 0 and step['trees']['max'] == 1
    assert step['messages']['mean'] == 3 and step['messages']['max'] == 4
    assert step['bytes']['max'] == 16
    change = run['events']['trainable_change']  # the full exchange, in that step only
    assert change['collectives_max'] == 0 and change['bytes_max'] > 16


def replicas_checked(perturb: bool):
    """ReplicaConsistencyHook's check on 3 ranks: rank 2's second parameter perturbed, or not."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from mmengine.logging import MMLogger
    from torch import nn

    from mmddp_hooks.hooks import ReplicaConsistencyHook

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    if perturb and dist.get_rank() == 2:
        with torch.no_grad():
            model[0].bias[1] += 1e-7
    runner = SimpleNamespace(model=model, iter=12, logger=MMLogger.get_instance('replicas'))
    try:
        ReplicaConsistencyHook().check(runner)
        return 'agree'
    except RuntimeError as e:
        return str(e)


@pytest.mark.dist
def test_the_replica_check_names_a_parameter_that_differs_on_one_rank():
    assert run_distributed(replicas_checked, 3, args=(False,), timeout=60) == ['agree'] * 3
    rows = run_distributed(replicas_checked, 3, args=(True,), timeout=60)
    assert rows == ['DDP replicas diverged at iteration 12: 1 parameters differ across ranks, '
                    'e.g. 0.bias'] * 3
