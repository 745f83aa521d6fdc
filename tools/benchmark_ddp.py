#!/usr/bin/env python
"""Benchmark every DDP setting against the auto plan, interleaved in the same gloo processes.

    python tools/benchmark_ddp.py [--nproc 2] [--rounds 200] [--quick] [--json out.json] [--plot out.png]
    python tools/benchmark_ddp.py --device cuda [--rounds 200] [--json out.json] [--plot out.png]
    python tools/benchmark_ddp.py --rebuild-memory [--json out.json]
    python tools/benchmark_ddp.py --keepalive [--rounds 200] [--quick] [--json out.json]
    python tools/benchmark_ddp.py --guard-cost [--nproc 1] [--rounds 100] [--json out.json]

Prints a markdown table: per scenario and setting, the median step time of the slowest rank and the
median (min-max) of per-round ratios against the best valid hand-picked setting; invalid settings
show the error that made them invalid. Per scenario, one more row: auto's step with HangWatchdogHook
against without it, in alternating blocks (its heartbeat thread runs through a whole block). CPU gloo
shows no NCCL compute/communication overlap.

``--device cuda`` times real models instead (``--models real``, the default there): torchvision
ResNet-50 and ViT-B/16 with an unused head at batch 16 and 64, and the mmseg FCN, under NCCL with
bf16 autocast, one rank per GPU (``--nproc``, default 1). Ratios are against plain DDP with
``find_unused_parameters=False`` and the unused head ignored. ``--device cpu --models real --quick``
runs the same code on gloo with a ResNet-18 and a one-block ViT on 32 x 32 images.

``--rebuild-memory`` measures instead the peak memory of a plan change (DDP rebuilt in place) plus two
steps against two ordinary steps, on one rank, for a 109 M parameter model, with gradients copied out
of DDP's buckets and as views of them (``benchmarks.benchmark.rebuild_memory``).

``--keepalive`` measures what zero-weighted keep-alive terms (``loss + 0.0 * idle parameters``, under
find_unused_parameters=False) cost against DDPAutoTuneHook's plan for the model without them: the
ratio of step times, interleaved, and of the bytes all-reduced, and how far their training parts.

``--guard-cost`` times the guard's host work per step on its own, in microseconds: before_backward,
after_backward without its exchange, the exchange, and after_step, for torchvision ResNet-50 and
ViT-B/16 with an unused head and a 300-tensor stack (``benchmarks.guard_cost``).
"""
# isort: off
import _venv  # noqa: F401 - first: re-runs the tool under the project's .venv if needed
# isort: on
import argparse
import json
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # benchmarks/: a top-level package beside the installed one
    sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--nproc', type=int, help='ranks (default: 2; 1 with --models real)')
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    p.add_argument('--models', choices=('toy', 'real'),
                   help='toy scenarios (default on cpu) or real models (default on cuda)')
    p.add_argument('--rounds', type=int, default=200)
    p.add_argument('--warmup', type=int, default=8)
    p.add_argument('--quick', action='store_true', help='tiny models, few rounds, no mmseg model')
    p.add_argument('--scenarios', nargs='+', help='subset of scenario names')
    p.add_argument('--mmseg-config', default=str(Path(__file__).parents[1] / 'configs' / 'mmseg' /
                                                 'fcn_r18_stage4-unused.py'),
                   help="real mmseg model scenario ('' to skip)")
    p.add_argument('--mmseg-frozen-config', default=str(
        Path(__file__).parents[1] / 'configs' / 'mmseg' / 'fcn_r18_unfreeze-schedule.py'),
                   help="the same model with frozen_stages=2, which stay frozen ('' to skip)")
    p.add_argument('--json', help='write the results here')
    p.add_argument('--plot', help='write a PNG of the ratios here')
    p.add_argument('--timeout', type=float, default=900.0, help='seconds per scenario')
    p.add_argument('--watchdog-pairs', type=int, default=4,
                   help="HangWatchdogHook's cost: pairs of blocks of auto's step with and without "
                        'it, per scenario (0 to skip)')
    p.add_argument('--watchdog-block-s', type=float, default=3.0, help='seconds a block lasts')
    p.add_argument('--watchdog-interval', type=float, default=1.0,
                   help="the hook's heartbeat interval (its default: 1 s)")
    p.add_argument('--rebuild-memory', action='store_true',
                   help='measure the peak memory of a rebuild instead (see above)')
    p.add_argument('--keepalive', action='store_true',
                   help='only: keep-alive terms against the plan without them')
    p.add_argument('--guard-cost', action='store_true',
                   help="only: the guard's host work per step (see above)")
    p.add_argument('--guard-models', nargs='+', default=['resnet50', 'vit_b_16', 'linears300'])
    args = p.parse_args(argv)
    from benchmarks import benchmark as bench
    from mmddp_hooks.ranks import run_on_ranks

    if args.keepalive:
        shape = dict(depth=2, width=8) if args.quick else {}
        run = run_on_ranks(bench.run_keepalive, args.nproc or 2,
                           args=(min(args.rounds, 6) if args.quick else args.rounds,
                                 6 if args.quick else args.warmup), kwargs=shape,
                           timeout=args.timeout)
        if not run.ok:
            print(f'keep-alive benchmark failed:\n{run.describe()}', file=sys.stderr)
            return 1
        result = bench.summarise_keepalive(run.ranks[0].value)
        print(bench.format_keepalive(result))
        if args.json:
            Path(args.json).write_text(json.dumps(dict(nproc=args.nproc or 2, keepalive=result),
                                                   indent=2))
        return 0
    if args.rebuild_memory:
        return rebuild_memory(args)
    if args.guard_cost:
        return guard_cost(args)
    real = (args.models or ('real' if args.device == 'cuda' else 'toy')) == 'real'
    if args.device == 'cuda' and not real:
        p.error('--device cuda times the real models (--models real)')
    nproc = args.nproc or (1 if real else 2)
    run_kw: dict = {}
    if real:
        scenarios = bench.real_scenarios(args.device, args.quick, args.mmseg_config or None)
        watchdog = None  # its cost is measured on the toy scenarios
        if args.device == 'cuda':
            import torch

            run_kw = dict(backend='nccl', local_devices=torch.cuda.device_count())
    else:
        scenarios = dict(bench.QUICK if args.quick else bench.SCENARIOS)
        if not args.quick and args.mmseg_config:
            scenarios['mmseg_fcn_r18'] = dict(config=args.mmseg_config)
        if not args.quick and args.mmseg_frozen_config:
            scenarios['mmseg_fcn_r18_frozen_stages'] = dict(config=args.mmseg_frozen_config)
        watchdog = dict(pairs=2, block_s=0.3, interval=0.1) if args.quick else dict(
            pairs=args.watchdog_pairs, block_s=args.watchdog_block_s,
            interval=args.watchdog_interval)
        if not watchdog['pairs']:
            watchdog = None
    if args.scenarios:
        scenarios = {k: v for k, v in scenarios.items() if k in args.scenarios}
    rounds = min(args.rounds, 6) if args.quick else args.rounds
    warmup = 6 if args.quick else args.warmup
    results = []
    for name, scenario in scenarios.items():
        run = run_on_ranks(bench.run_scenario, nproc, args=(scenario, rounds, warmup),
                           kwargs=dict(watchdog=watchdog),
                           timeout=args.timeout, **run_kw)
        if not run.ok:
            print(f'scenario {name} failed:\n{run.describe()}', file=sys.stderr)
            return 1
        results.append(bench.summarise(name, run.ranks[0].value))
        print(f'done: {name}', file=sys.stderr, flush=True)
    print(bench.format_table(results))
    if args.json:
        out = dict(nproc=nproc, rounds=rounds, results=results)
        if real:
            out.update(device=args.device, **_versions(args.device))
        Path(args.json).write_text(json.dumps(out, indent=2))
    if args.plot:
        bench.plot(results, args.plot)
    return 0


def guard_cost(args) -> int:
    from benchmarks import guard_cost as cost
    from mmddp_hooks.ranks import run_on_ranks

    nproc = args.nproc or 1
    run = run_on_ranks(cost.measure_all, nproc, args=(args.guard_models, args.rounds),
                       timeout=args.timeout)
    if not run.ok:
        print(f'guard cost failed:\n{run.describe()}', file=sys.stderr)
        return 1
    rows = run.ranks[0].value
    print(cost.format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(nproc=nproc, rows=rows), indent=2))
    return 0


def _versions(device: str) -> dict:
    """What the real models ran on."""
    import torch
    import torchvision

    out = dict(torch=torch.__version__, torchvision=torchvision.__version__)
    if device == 'cuda':
        out['gpu'] = torch.cuda.get_device_name(0)
    return out


def rebuild_memory(args) -> int:
    """Peak memory across rebuilds, one rank; on CPU with freed tensors given back to the system."""
    from benchmarks import benchmark as bench
    from mmddp_hooks.ranks import run_on_ranks

    results = []
    for bucket_view in (False, True):
        run = run_on_ranks(bench.rebuild_memory, 1, kwargs=dict(bucket_view=bucket_view),
                           env={'MALLOC_MMAP_THRESHOLD_': '65536'}, timeout=args.timeout)
        if not run.ok:
            print(f'rebuild memory failed:\n{run.describe()}', file=sys.stderr)
            return 1
        results.append(run.ranks[0].value)
    print('| gradients | round | rebuilt to | steady: 2 steps | rebuild | rebuild + 2 steps |')
    print('| --- | --- | --- | --- | --- | --- |')
    for res in results:
        for i, r in enumerate(res['rounds']):
            print(f"| {'bucket views' if res['bucket_view'] else 'copies'} | {i} | {r['plan']} | "
                  f"{r['steady_mb']:.0f} MB | {r['rebuild_mb']:.0f} MB | "
                  f"{r['rebuild_and_steps_mb']:.0f} MB |")
    for res in results:
        print(f"{res['params_m']:.1f} M params, {'bucket views' if res['bucket_view'] else 'copies'}"
              f": peak of rebuild + 2 steps / peak of 2 steps = {res['ratio']:.3f} ({res['peak']})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
