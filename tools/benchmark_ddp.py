#!/usr/bin/env python
"""Benchmark every DDP setting against the auto plan, interleaved in the same gloo processes.

    python tools/benchmark_ddp.py [--nproc 2] [--rounds 200] [--quick] [--json out.json] [--plot out.png]
    python tools/benchmark_ddp.py --rebuild-memory [--json out.json]

Prints a markdown table: per scenario and setting, the median step time of the slowest rank and the
median (min-max) of per-round ratios against the best valid hand-picked setting; invalid settings
show the error that made them invalid. Per scenario, one more row: auto's step with HangWatchdogHook
against without it, in alternating blocks (its heartbeat thread runs through a whole block). CPU gloo
shows no NCCL compute/communication overlap.

``--rebuild-memory`` measures instead the peak memory of a plan change (DDP rebuilt in place) plus two
steps against two ordinary steps, on one rank, for a 109 M parameter model, with gradients copied out
of DDP's buckets and as views of them (``mmddp_hooks.benchmark.rebuild_memory``).
"""
# isort: off
import _venv  # noqa: F401 - first: re-runs the tool under the project's .venv if needed
# isort: on
import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--nproc', type=int, default=2)
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
    args = p.parse_args(argv)
    from mmddp_hooks import benchmark as bench
    from mmddp_hooks.testing import run_on_ranks

    if args.rebuild_memory:
        return rebuild_memory(args)

    scenarios = dict(bench.QUICK if args.quick else bench.SCENARIOS)
    if not args.quick and args.mmseg_config:
        scenarios['mmseg_fcn_r18'] = dict(config=args.mmseg_config)
    if not args.quick and args.mmseg_frozen_config:
        scenarios['mmseg_fcn_r18_frozen_stages'] = dict(config=args.mmseg_frozen_config)
    if args.scenarios:
        scenarios = {k: v for k, v in scenarios.items() if k in args.scenarios}
    rounds = min(args.rounds, 6) if args.quick else args.rounds
    warmup = 6 if args.quick else args.warmup
    watchdog = dict(pairs=2, block_s=0.3, interval=0.1) if args.quick else dict(
        pairs=args.watchdog_pairs, block_s=args.watchdog_block_s, interval=args.watchdog_interval)
    if not watchdog['pairs']:
        watchdog = None
    results = []
    for name, scenario in scenarios.items():
        run = run_on_ranks(bench.run_scenario, args.nproc, args=(scenario, rounds, warmup),
                           kwargs=dict(watchdog=watchdog),
                           timeout=args.timeout)
        if not run.ok:
            print(f'scenario {name} failed:\n{run.describe()}', file=sys.stderr)
            return 1
        results.append(bench.summarise(name, run.ranks[0].value))
        print(f'done: {name}', file=sys.stderr, flush=True)
    print(bench.format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(nproc=args.nproc, rounds=rounds,
                                                   results=results), indent=2))
    if args.plot:
        bench.plot(results, args.plot)
    return 0


def rebuild_memory(args) -> int:
    """Peak memory across rebuilds, one rank; on CPU with freed tensors given back to the system."""
    from mmddp_hooks import benchmark as bench
    from mmddp_hooks.testing import run_on_ranks

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
