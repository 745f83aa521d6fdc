"""What mmddp_hooks adds beside DDP's own all-reduce, counted on N CPU ranks of one machine.

:func:`simulate` forks N gloo ranks of a small model (:class:`SimNet`) trained through a Runner under
the product: ``DDPAutoTuneHook`` (a probe, then a guarded plan that ignores a never-used layer and
zero-fills a layer used on even ranks only), ``HangWatchdogHook`` and one trainable-set change
(``TrainableScheduleHook`` freezes a layer mid-run, so every rank rebuilds DDP). Ranks are grouped
into simulated nodes (``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and ``GROUP_RANK`` as torchrun sets
them). No rank hosts the store: the parent serves it behind :class:`~benchmarks.store_proxy.StoreProxy`
(``TORCHELASTIC_USE_AGENT_STORE=True``, as under torchrun's agent), which counts every store request
and byte of every rank.

Exact here (counts): store requests and bytes per rank per second, idle (the ranks wait between two
iterations, as in a checkpoint save) and while stepping; collectives this package issues per step
and their payload bytes per rank, counted at torch.distributed's Python functions (DDP's own
gradient all-reduce runs in C++ and is not counted: it is not ours). Not exact here (times): N
processes share 2 cores, so a wait for a peer includes the time the scheduler takes to run it.
"""
import itertools
import json
import multiprocessing
import os
import pickle
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import METRICS
from torch import nn
from torch.utils.data import Dataset

DIM = 16
_COUNTED = ('all_reduce', 'all_gather', 'all_gather_object', 'all_gather_into_tensor', 'broadcast',
            'broadcast_object_list', 'barrier', 'reduce', 'gather', 'gather_object', 'scatter',
            'reduce_scatter_tensor', 'send', 'recv', 'isend', 'irecv', 'batch_isend_irecv',
            'new_group', 'all_to_all_single')


# ------------------------------------------------------------------------------------ one rank
class SimVectors(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(7)
        self.x, self.y = torch.randn(n, DIM, generator=g), torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return dict(inputs=self.x[i], target=self.y[i])


class SimNet(BaseModel):
    """trunk -> head, plus ``aux`` (frozen mid-run by the schedule), ``local`` (used on even ranks
    only: the plan zero-fills it on the others) and ``never`` (never called: the plan ignores it).
    ``stuck``: (rank, iteration) at which that rank calls ``stall`` in forward (user code, which
    the hang report names; this package's own frames are not the user's)."""

    def __init__(self, stuck: Optional[Sequence[int]] = None,
                 stall: Optional[Callable[[], None]] = None) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(DIM, DIM), nn.ReLU(), nn.Linear(DIM, DIM))
        self.aux = nn.Linear(DIM, 1)
        self.local = nn.Linear(DIM, DIM)
        self.never = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, 1)
        self.stuck = tuple(stuck) if stuck else None
        self.stall = stall
        self.steps = 0

    def forward(self, inputs, target=None, mode='loss'):
        h = self.trunk(inputs)
        if dist.get_rank() % 2 == 0:
            h = h + self.local(h)
        out = self.head(h) + self.aux(h)
        if mode != 'loss':
            return out
        self.steps += 1
        if self.stuck and (dist.get_rank(), self.steps) == self.stuck:
            self.stall()
        return dict(loss=((out - target) ** 2).mean())


@METRICS.register_module(force=True)
class SimLoss(BaseMetric):
    """The val loop's metric: the loop has to run (its phases are what the watchdog sees)."""

    def process(self, data_batch, data_samples) -> None:
        self.results.extend(float(o.mean()) for o in data_samples)

    def compute_metrics(self, results) -> Dict[str, float]:
        return dict(out=sum(results) / max(len(results), 1))


class _Meter(Hook):
    """Per iteration: what this package issued (collectives, payload bytes, tree time), the step's
    time; one idle pause between two iterations."""

    priority = 'LOWEST'

    def __init__(self, counter: '_Counter', idle_at: int, idle_s: float) -> None:
        self.counter, self.idle_at, self.idle_s = counter, idle_at, idle_s
        self.rows: List[Dict[str, Any]] = []
        self.idle = (0.0, 0.0)
        self.idle_beats = 0  # the watchdog's heartbeats in the idle pause
        self.train = (0.0, 0.0)

    def before_train(self, runner) -> None:
        self.train = (time.time(), 0.0)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._start = (time.time(), time.perf_counter(), self.counter.snapshot())

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        start, t0, before = self._start
        now = self.counter.snapshot()
        self.rows.append(dict(iter=runner.iter + 1, start=start, end=time.time(),
                              step_s=time.perf_counter() - t0,
                              **{k: now[k] - before[k] for k in now}))
        if runner.iter + 1 == self.idle_at:
            watch = next(h for h in runner.hooks if type(h).__name__ == 'HangWatchdogHook')
            start, beats = time.time(), watch.beats
            time.sleep(self.idle_s)
            self.idle, self.idle_beats = (start, time.time()), watch.beats - beats

    def after_train(self, runner) -> None:
        self.train = (self.train[0], time.time())


class _Counter:
    """Counts the torch.distributed calls of this process (outermost only: an object gather's
    inner tensor gathers are part of it) and the time spent in the control tree's reductions."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.bytes = 0
        self.messages = 0  # point-to-point messages (the tree's)
        self.tree_s = 0.0
        self.trees = 0
        self._depth = threading.local()

    def snapshot(self) -> Dict[str, float]:
        return dict(collectives=sum(self.calls.values()) - self.messages, bytes=self.bytes,
                    messages=self.messages, tree_s=self.tree_s, trees=self.trees)

    def install(self) -> None:
        from mmddp_hooks import dist as ddist

        for name in _COUNTED:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))
        reduce = ddist.ControlTree.all_reduce

        def timed(tree, flags, op=dist.ReduceOp.SUM):
            start = time.perf_counter()
            try:
                return reduce(tree, flags, op)
            finally:
                self.tree_s += time.perf_counter() - start
                self.trees += 1
        ddist.ControlTree.all_reduce = timed

    def _wrap(self, name: str, fn):
        def counted(*args, **kwargs):
            depth = getattr(self._depth, 'n', 0)
            if depth == 0:
                self.calls[name] += 1
                self.bytes += _payload(name, args)
                self.messages += name in ('send', 'recv', 'isend', 'irecv')
            self._depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth
        return counted


def _payload(name: str, args: tuple) -> int:
    """Bytes this rank contributes to a call: its tensor, or its pickled object."""
    if name in ('all_gather_object', 'gather_object'):
        return len(pickle.dumps(args[1])) if len(args) > 1 else 0
    if name == 'broadcast_object_list':
        return len(pickle.dumps(args[0])) if args else 0
    if name == 'all_gather' and len(args) > 1:
        args = args[1:]
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.numel() * a.element_size()
    return 0


def _rank_job(rank: int, cfg: Dict[str, Any], pipe) -> None:
    """One rank: wait for the store's address, train, measure, send the results, exit."""
    os.setsid()
    torch.set_num_threads(1)
    env = pipe.recv()
    os.environ.update(env)
    counter = _Counter()
    counter.install()
    try:
        pipe.send(dict(ok=True, **_train(rank, cfg, counter)))
    except BaseException as e:  # the parent names the failing rank with its error
        import traceback
        pipe.send(dict(ok=False, error=f'{e!r}\n{traceback.format_exc()}'))
    finally:
        sys.stdout.flush()
        os._exit(0)


def _train(rank: int, cfg: Dict[str, Any], counter: _Counter) -> Dict[str, Any]:
    from mmengine.config import Config
    from mmengine.runner import Runner

    from mmddp_hooks import dist as ddist
    from mmddp_hooks.model_from_config import unformatted

    dist.init_process_group('gloo')
    ddist.store().set(f'scale_sim/rank/{rank}', b'')  # tells the proxy which connection is ours
    world, iters = dist.get_world_size(), cfg['iters']
    meter = _Meter(counter, cfg['idle_at'], cfg['idle_s'])
    watch = dict(type='HangWatchdogHook', interval=cfg['interval'], action='abort',
                 timeout=cfg['hang_timeout'], min_timeout=cfg['hang_timeout'] or 300.0)
    schedule = dict(type='TrainableScheduleHook', schedule=[dict(at=cfg['freeze_at'],
                                                                freeze=['aux.*'])])
    optim = dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=1e-4))
    torch.manual_seed(0)
    runner = Runner(
        model=SimNet(cfg['stuck'], cfg['stall']), work_dir=cfg['work_dir'],
        experiment_name=f'scale_sim_{world}_{os.getppid()}',
        train_dataloader=dict(dataset=SimVectors(4 * iters * world), batch_size=2, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=True),
                              collate_fn=dict(type='default_collate')),
        val_dataloader=dict(dataset=SimVectors(8), batch_size=2, num_workers=0,
                            sampler=dict(type='DefaultSampler', shuffle=False),
                            collate_fn=dict(type='default_collate')),
        val_evaluator=dict(type='SimLoss'), val_cfg=dict(),
        train_cfg=dict(by_epoch=False, max_iters=iters, val_interval=cfg['val_interval']),
        optim_wrapper=optim,
        cfg=unformatted(Config(dict(model_wrapper_cfg=dict(type='ReconfigurableDDP'),
                                    optim_wrapper=optim))),
        custom_hooks=[dict(type='DDPAutoTuneHook', probe_iters=4), watch, schedule, meter],
        default_hooks=dict(logger=dict(type='LoggerHook', interval=10 ** 6),
                           checkpoint=dict(type='CheckpointHook', interval=10 ** 6,
                                           by_epoch=False)),
        launcher='pytorch', env_cfg=dict(dist_cfg=dict(backend='gloo')),
        randomness=dict(seed=0), log_level='WARNING')
    runner.train()
    model = runner.model
    out = dict(rank=rank, rows=meter.rows, idle=meter.idle, idle_beats=meter.idle_beats,
               train=meter.train,
               plan=model.plan.summary() if model.plan else None,
               trainable_log=list(model.trainable_log), switch_log=list(model.switch_log),
               tree=dict(parent=ddist.control_tree(model.process_group).parent,
                         children=ddist.control_tree(model.process_group).children))
    out['exchange'] = _exchange_rounds(cfg['rounds'], len(model.guard.names) + 1
                                       if model.guard else 1)
    del runner, model
    ddist.teardown()
    return out


def _exchange_rounds(rounds: int, width: int) -> Dict[str, float]:
    """The guard's per-step exchange before and after this change, interleaved: gloo's ring
    all-reduce of one int per watched parameter (before) and the control tree's reduction of one
    int (now); per op, the median over rounds of this rank's wall time."""
    from mmddp_hooks import dist as ddist

    ring, tree = torch.zeros(width, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    pg = ddist.control_group()
    ddist.barrier()
    times: Dict[str, List[float]] = {'ring': [], 'tree': []}
    for _ in range(rounds):
        start = time.perf_counter()
        ddist.all_reduce_(ring, pg)
        mid = time.perf_counter()
        ddist.all_reduce_flags(tree, op=dist.ReduceOp.MAX)
        times['ring'].append(mid - start)
        times['tree'].append(time.perf_counter() - mid)
    return {k: statistics.median(v) for k, v in times.items()}


# ------------------------------------------------------------------------------------ the parent
def node_layout(ranks: int, node_sizes: Sequence[int]) -> List[int]:
    """Ranks per node: ``node_sizes`` repeated (the last node takes what is left)."""
    sizes, left = [], ranks
    for size in itertools.cycle(node_sizes):
        if left <= 0:
            return sizes
        sizes.append(min(size, left))
        left -= sizes[-1]
    return sizes


def simulate(ranks: int, node_sizes: Sequence[int] = (4,), iters: int = 100,
             interval: float = 0.2, idle_s: float = 3.0, rounds: int = 50,
             stuck: Optional[Sequence[int]] = None, stall: Optional[Callable[[], None]] = None,
             hang_timeout: Optional[float] = None, timeout_s: float = 900.0) -> Dict[str, Any]:
    """Run one simulation on ``ranks`` forked ranks; returns what each rank measured and what the
    store proxy counted (see :func:`summarize`). ``stuck``/``stall``: see :class:`SimNet`."""
    import datetime

    from mmddp_hooks.compat import store_wire_protocol_known

    from .store_proxy import StoreProxy

    if not store_wire_protocol_known():
        raise SystemExit('scale simulation: its store proxy counts requests as torch >= 2.2 sends '
                         'them, and the installed torch is older')
    sizes = node_layout(ranks, node_sizes)
    work_dir = tempfile.mkdtemp(prefix=f'mmddp_scale_{ranks}_')
    cfg = dict(iters=iters, interval=interval, idle_s=idle_s, idle_at=iters * 3 // 4 + 5,
               freeze_at=iters * 3 // 4, val_interval=max(iters // 4, 1), rounds=rounds,
               stuck=stuck, stall=stall, hang_timeout=hang_timeout, work_dir=work_dir)
    ctx = multiprocessing.get_context('fork')
    procs, pipes = [], []
    for rank in range(ranks):  # forked before any thread starts here: nothing held at the fork
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_rank_job, args=(rank, cfg, theirs), daemon=True)
        proc.start()
        procs.append(proc)
        pipes.append(mine)
    store = dist.TCPStore('127.0.0.1', 0, None, True, timeout=datetime.timedelta(seconds=300),
                          wait_for_workers=False)
    proxy = StoreProxy(store.port)
    rank = 0
    for node, size in enumerate(sizes):
        for local in range(size):
            pipes[rank].send(dict(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(local),
                                  LOCAL_WORLD_SIZE=str(size), GROUP_RANK=str(node),
                                  MASTER_ADDR='127.0.0.1', MASTER_PORT=str(proxy.port),
                                  TORCHELASTIC_USE_AGENT_STORE='True',
                                  TORCHELASTIC_RESTART_COUNT='0'))  # torchrun sets it; torch 2.1 reads it
            rank += 1
    results = _collect(procs, pipes, time.time() + timeout_s)
    for proc in procs:
        proc.join(5)
        if proc.is_alive():
            os.killpg(proc.pid, signal.SIGKILL)
    proxy.close()
    requests, replies = proxy.snapshot()
    report = os.path.join(work_dir, 'hang_report.txt')
    hang_report = open(report).read() if os.path.exists(report) else None
    return dict(ranks=ranks, nodes=sizes, cfg=cfg, results=results, hang_report=hang_report,
                conns=proxy.connection_of('scale_sim/rank/'), unparsed=proxy.unparsed,
                requests=[(q.time, q.conn, q.kind, q.nbytes) for q in requests],
                replies=replies)


def _collect(procs, pipes, deadline: float) -> Dict[int, Dict[str, Any]]:
    """Each rank's result, as it comes; a rank that exits without one (a hang's abort) or is
    still running at ``deadline`` gets an error instead."""
    from multiprocessing.connection import wait

    results: Dict[int, Dict[str, Any]] = {}
    waiting = dict(enumerate(zip(procs, pipes)))
    while waiting and time.time() < deadline:
        ready = wait([p for _, p in waiting.values()] + [pr.sentinel for pr, _ in waiting.values()],
                     timeout=max(0.0, deadline - time.time()))
        for r, (proc, pipe) in list(waiting.items()):
            if pipe in ready or pipe.poll():
                try:
                    results[r] = pipe.recv()
                except EOFError:
                    results[r] = dict(ok=False, error=f'exited with code {proc.exitcode}')
            elif proc.sentinel in ready:
                proc.join()
                results[r] = dict(ok=False, error=f'exited with code {proc.exitcode} and no '
                                                  'result')
            else:
                continue
            del waiting[r]
    for r in waiting:
        results[r] = dict(ok=False, error='no result in time')
    return results


def _window(events: List[tuple], conn: int, start: float, end: float, size: int) -> tuple:
    picked = [e for e in events if e[1] == conn and start <= e[0] < end]
    return len(picked), sum(e[size] for e in picked)


def summarize(run: Dict[str, Any]) -> Dict[str, Any]:
    """Per-rank rates and per-step counts from :func:`simulate`'s raw record."""
    results, cfg = run['results'], run['cfg']
    failed = {r: v['error'] for r, v in results.items() if not v.get('ok')}
    if failed:
        return dict(ranks=run['ranks'], failed=failed, hang_report=run['hang_report'])
    interval = cfg['interval']
    store: Dict[str, List[float]] = {k: [] for k in ('idle_req_s', 'idle_bytes_s',
                                                     'step_req_s', 'step_bytes_s')}
    startup: List[int] = []  # requests before training: process groups, the tree's gather
    per_beat: List[float] = []  # the idle pause's requests per heartbeat: counted, not timed
    steady = _steady(results[0]['rows'], cfg)
    for rank, res in results.items():
        conn = int(run['conns'][str(rank)])
        i0, i1 = res['idle']
        rows = {r['iter']: r for r in res['rows']}
        # idle: the pause less one interval at each end; stepping: the guarded plan's steps
        # before the trainable-set change (val loops in it)
        windows = dict(idle=(i0 + interval, i1 - interval),
                       step=(rows[steady[0]]['start'], rows[cfg['freeze_at']]['end']))
        startup.append(_window(run['requests'], conn, 0.0, res['train'][0], 3)[0])
        per_beat.append(_window(run['requests'], conn, i0, i1, 3)[0] / max(1, res['idle_beats']))
        for name, (start, end) in windows.items():
            n, b = _window(run['requests'], conn, start, end, 3)
            _, rb = _window([(t, c, 0, nb) for t, c, nb in run['replies']], conn, start, end, 3)
            store[f'{name}_req_s'].append(n / (end - start))
            store[f'{name}_bytes_s'].append((b + rb) / (end - start))
    per_step = {k: [] for k in ('collectives', 'bytes', 'messages', 'trees')}
    tree_ms, step_ms = [], []
    for res in results.values():
        rows = [r for r in res['rows'] if r['iter'] in steady]
        for k in per_step:
            per_step[k].append(sum(r[k] for r in rows) / len(rows))
        tree_ms.append(1e3 * statistics.median(r['tree_s'] for r in rows))
        step_ms.append(1e3 * statistics.median(r['step_s'] for r in rows))
    events = {}
    # the schedule's `at` is 0-based: the change shows in iteration freeze_at + 1 (1-based)
    for name, it in (('probe_end', 4), ('trainable_change', cfg['freeze_at'] + 1)):
        rows = [next(r for r in res['rows'] if r['iter'] == it) for res in results.values()]
        events[name] = dict(iteration=it, collectives_max=max(r['collectives'] for r in rows),
                            bytes_max=max(r['bytes'] for r in rows))
    exchange = {k: 1e3 * max(res['exchange'][k] for res in results.values())
                for k in ('ring', 'tree')}
    r0 = results[0]
    return dict(
        ranks=run['ranks'], nodes=run['nodes'], interval_s=interval,
        plan=r0['plan'], trainable_log=r0['trainable_log'], switch_log=r0['switch_log'],
        store_per_rank={k: dict(mean=statistics.mean(v), max=max(v), min=min(v))
                        for k, v in store.items()},
        store_requests_per_interval=statistics.mean(store['idle_req_s']) * interval,
        store_requests_per_beat=dict(mean=statistics.mean(per_beat), max=max(per_beat),
                                     min=min(per_beat)),
        startup_requests_per_rank=dict(mean=statistics.mean(startup), max=max(startup)),
        unparsed=run['unparsed'],
        steady_iterations=len(steady),
        per_step_per_rank={k: dict(mean=statistics.mean(v), max=max(v)) for k, v in
                           per_step.items()},
        events=events,
        tree_links_max=max(len(res['tree']['children']) + (res['tree']['parent'] is not None)
                           for res in results.values()),
        times_ms=dict(tree_median_max=max(tree_ms), step_median_max=max(step_ms),
                      exchange_ring_max=exchange['ring'], exchange_tree_max=exchange['tree']))


def _steady(rows: List[Dict[str, Any]], cfg: Dict[str, Any]) -> List[int]:
    """Iterations of the guarded plan in which nothing happens: after the probe, not the step of
    the trainable-set change or the one after, not the pause's, not a val loop's."""
    skip = {cfg['freeze_at'] + 1, cfg['freeze_at'] + 2, cfg['idle_at'], cfg['idle_at'] + 1}
    skip |= {i + 1 for i in range(cfg['val_interval'], cfg['iters'] + 1, cfg['val_interval'])}
    return [r['iter'] for r in rows if r['iter'] > 6 and r['iter'] not in skip]


# ------------------------------------------------------------------------------------ the model
def hops(ranks: int, ranks_per_node: int) -> Dict[str, int]:
    """Messages one after another on the critical path of one exchange: up and down the control
    tree (local and between nodes), and around gloo's ring."""
    nodes = -(-ranks // ranks_per_node)
    return dict(tree_local=2 * (min(ranks, ranks_per_node).bit_length() - 1),
                tree_node=2 * (nodes.bit_length() - 1), ring=2 * (ranks - 1), nodes=nodes)


def fit(rows: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Fit ``time = hops x hop + contention x N**2`` to the measured exchanges (tree and ring, every
    run): ``hop`` is one message's latency here, ``contention`` what N processes sharing this
    machine's cores add (each must be scheduled in turn; zero where every rank has a core)."""
    import numpy as np

    a, y = [], []
    for r in rows:
        h = hops(r['ranks'], r['nodes'][0])
        a += [[h['tree_local'] + h['tree_node'], r['ranks'] ** 2], [h['ring'], r['ranks'] ** 2]]
        y += [r['times_ms']['exchange_tree_max'], r['times_ms']['exchange_ring_max']]
    (hop, contention), *_ = np.linalg.lstsq(np.array(a, float), np.array(y), rcond=None)
    return dict(hop_ms=float(hop), contention_ms=float(contention))


def predict(ranks: int, ranks_per_node: int, hop_local_ms: float, hop_node_ms: float,
            interval_s: float = 1.0, contention_ms: float = 0.0) -> Dict[str, float]:
    """What the model says mmddp_hooks adds at ``ranks``: the guard's per-step exchange (before:
    gloo's ring over one int per parameter; now: the control tree over one int), the
    watchdog's store requests (before: every rank read every heartbeat, a check and a get, which
    torch sends as a wait and a get; now: one), and the messages of the busiest rank per step."""
    h = hops(ranks, ranks_per_node)
    ring_hop = hop_node_ms if h['nodes'] > 1 else hop_local_ms
    crowd = contention_ms * ranks ** 2
    return dict(
        ranks=ranks, nodes=h['nodes'],
        tree_ms=h['tree_local'] * hop_local_ms + h['tree_node'] * hop_node_ms + crowd,
        ring_ms=h['ring'] * ring_hop + crowd,
        store_requests_per_rank_s=4 / interval_s,
        store_requests_per_rank_s_before=(2 + 3 * ranks) / interval_s,
        store_requests_total_s=4 * ranks / interval_s,
        store_requests_total_s_before=(2 + 3 * ranks) * ranks / interval_s,
        messages_per_step_max=2 * min(5, max(ranks - 1, 0)))


def write_json(path: str, data: Any) -> None:
    with open(path, 'w') as f:
        json.dump(data, f, indent=2, default=str)
