"""The guard's host work per step, timed on its own (``tools/benchmark_ddp.py --guard-cost``).

On fast GPUs a ResNet-50 or ViT-B/16 step takes 31-45 ms and is bound by the host launching
kernels, so whatever the guard does on the host per step shows in the step time. This times the
guard's parts for models with the parameter counts users have: torchvision ResNet-50 (161 parameter
tensors) and ViT-B/16 (152), each with an extra head that never reaches the loss (the plan ignores
it, the guard watches it), and a stack of 150 linear layers (300 tensors). Per step, in
microseconds: ``before_backward``; ``after_backward`` without its exchange; the exchange (the one
int over the control tree; nothing with one rank); ``after_step`` (the reads after the optimizer
step); the record of arrival's hooks inside the backward (:func:`record_cost`). The median over
steps, each rank; the slowest rank's. Real forward and backward passes on small inputs run between
the timed parts: their cost is not the guard's.
"""
import statistics
import time
from typing import Any, Callable, Dict, List

import torch
from torch import nn

from mmddp_hooks import dist as ddist
from mmddp_hooks.arrival import GradArrival
from mmddp_hooks.plan import DDPPlan
from mmddp_hooks.wrapper import ReconfigurableDDP


class _WithUnusedHead(nn.Module):
    def __init__(self, body: nn.Module, inputs: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self.body = body
        self.unused_head = nn.Linear(8, 8)  # never called: the plan ignores it
        self.inputs = inputs

    def forward(self) -> torch.Tensor:
        return self.body(self.inputs()).float().mean()


class _Linears(nn.Module):
    def __init__(self, n: int = 150) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(layer(x) for layer in self.layers)


def _torchvision(arch: str, **kwargs: Any) -> nn.Module:
    from torchvision import models as tv  # for its models only: linears300 runs without it

    return getattr(tv, arch)(**kwargs)


def models() -> Dict[str, Callable[[], nn.Module]]:
    """Each model, built the same way on every rank (seeded), with its input."""
    return dict(
        resnet50=lambda: _WithUnusedHead(_torchvision('resnet50'), lambda: torch.randn(2, 3, 32, 32)),
        vit_b_16=lambda: _WithUnusedHead(_torchvision('vit_b_16', image_size=32),
                                         lambda: torch.randn(2, 3, 32, 32)),
        linears300=lambda: _WithUnusedHead(_Linears(), lambda: torch.randn(2, 8)))


def measure(name: str, steps: int = 100, warmup: int = 10,
            set_to_none: bool = True) -> Dict[str, Any]:
    """Time the guard's parts on this rank for ``steps`` steps of model ``name`` (every rank
    calls: the plan is applied on each, and the exchange is a collective). ``set_to_none=False``:
    ``zero_grad`` leaves zero gradients, so every backward starts with them set, as under
    accumulation (the guard then hooks each parameter for that backward)."""
    torch.manual_seed(0)
    wrapper = ReconfigurableDDP(models()[name]())
    wrapper.apply_plan(DDPPlan(find_unused_parameters=False, ignore=[
        n for n, _ in wrapper.module.named_parameters() if n.startswith('unused_head.')]))
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=1e-3, momentum=0.9)
    exchange = _ExchangeClock()
    parts: Dict[str, List[float]] = {k: [] for k in ('before_backward', 'after_backward',
                                                     'exchange', 'after_step')}
    with exchange:
        for step in range(warmup + steps):
            loss = wrapper()
            t0 = time.perf_counter()
            wrapper.before_backward(loss)
            t1 = time.perf_counter()
            loss.backward()
            exchange.seconds = 0.0
            t2 = time.perf_counter()
            change = wrapper.after_backward()
            t3 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=set_to_none)
            t4 = time.perf_counter()
            wrapper.after_step(change)
            t5 = time.perf_counter()
            if change is not None:
                raise RuntimeError(f'guard cost: usage left the plan ({change})')
            if step >= warmup:
                parts['before_backward'].append(t1 - t0)
                parts['after_backward'].append(t3 - t2 - exchange.seconds)
                parts['exchange'].append(exchange.seconds)
                parts['after_step'].append(t5 - t4)
    watched = len(wrapper.guard.names)
    wrapper.close_guard()
    medians = {k: 1e6 * statistics.median(v) for k, v in parts.items()}
    medians['record'] = record_cost(len(wrapper.arrival.params), steps)
    medians['host'] = (medians['before_backward'] + medians['after_backward'] + medians['after_step']
                       + medians['record'])
    return dict(model=name, ranks=ddist.get_world_size(), watched=watched, steps=steps,
                zero_grad='set_to_none' if set_to_none else 'zeros', median_us=medians)


def record_cost(n: int, steps: int = 100, warmup: int = 10) -> float:
    """Microseconds the record of arrival's hooks add to a backward over ``n`` parameters: their
    Python calls run inside the backward, where a CPU model's compute would hide them (a GPU's
    backward is bound by the host). Timed on ``n`` one-element parameters summed, so the backward
    is little more than their AccumulateGrad nodes; steps with the hooks and without them
    alternate in this run, and the medians' difference is returned."""
    params = [nn.Parameter(torch.zeros(1)) for _ in range(n)]
    times: Dict[bool, List[float]] = {True: [], False: []}
    for step in range(2 * (warmup + steps)):
        hooked = step % 2 == 0
        record = GradArrival(params) if hooked else None
        if record is not None:
            record.open()
        loss = torch.stack(params).sum()
        t0 = time.perf_counter()
        loss.backward()
        seconds = time.perf_counter() - t0
        if record is not None:
            record.close()
        for p in params:
            p.grad = None
        if step >= 2 * warmup:
            times[hooked].append(seconds)
    return 1e6 * (statistics.median(times[True]) - statistics.median(times[False]))


class _ExchangeClock:
    """Times ``dist.all_reduce_flags`` (the guard's exchange) while in use."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> '_ExchangeClock':
        self._real = ddist.all_reduce_flags

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._real(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        ddist.all_reduce_flags = timed
        return self

    def __exit__(self, *exc) -> None:
        ddist.all_reduce_flags = self._real


def measure_all(names: List[str], steps: int = 100) -> List[Dict[str, Any]]:
    """:func:`measure` for each model, gradients set to None and to zeros after each step; every
    rank's medians gathered: the slowest rank's."""
    rows = []
    for name in names:
        for set_to_none in (True, False):
            mine = measure(name, steps, set_to_none=set_to_none)
            everyone = ddist.all_gather_object(mine['median_us'])
            mine['median_us'] = {k: max(m[k] for m in everyone) for k in mine['median_us']}
            rows.append(mine)
    return rows


def format_table(rows: List[Dict[str, Any]]) -> str:
    lines = ['| model | ranks | watched tensors | gradients after zero_grad | before_backward | '
             'after_backward | after_step | record, in backward | host, total | exchange |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        m = r['median_us']
        lines.append(f"| {r['model']} | {r['ranks']} | {r['watched']} | {r['zero_grad']} | "
                     f"{m['before_backward']:.0f} us | {m['after_backward']:.0f} us | "
                     f"{m['after_step']:.0f} us | {m['record']:.0f} us | **{m['host']:.0f} us** | "
                     f"{m['exchange']:.0f} us |")
    return '\n'.join(lines)
