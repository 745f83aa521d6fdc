"""What mmddp_hooks adds beside DDP at N ranks: counted on N CPU ranks here, modelled beyond.

    python tools/scale_sim.py --ranks 4 8 16 32 --out docs/scale_sim.json
    python tools/scale_sim.py --quick                     # 4 ranks, 2 nodes: the check make test runs
    python tools/scale_sim.py --hang 16                   # a rank stuck at 16 ranks: the report

See benchmarks/scale_sim.py for what is exact (counts) and what is not (times: N ranks on the
machine's cores).
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # benchmarks/: a top-level package beside the installed one
    sys.path.insert(0, ROOT)
from benchmarks.scale_sim import fit, predict, simulate, summarize, write_json  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--ranks', type=int, nargs='+', default=[4, 8, 16, 32])
    p.add_argument('--node-sizes', type=int, nargs='+', default=[4],
                   help='ranks per simulated node, repeated (e.g. 4 4 3: uneven nodes)')
    p.add_argument('--iters', type=int, default=200)
    p.add_argument('--interval', type=float, default=0.2, help="the watchdog's interval (s)")
    p.add_argument('--hop-node-us', type=float, default=50.0,
                   help='one message between nodes, for the model (a stated assumption)')
    p.add_argument('--model-ranks', type=int, nargs='+', default=[64, 256, 1024])
    p.add_argument('--model-node-size', type=int, default=8, help='GPUs per node, for the model')
    p.add_argument('--model-interval', type=float, default=1.0,
                   help="the watchdog's interval for the model's rates (the hook's default)")
    p.add_argument('--quick', action='store_true', help='4 ranks in 2 nodes, 30 iterations')
    p.add_argument('--hang', type=int, metavar='N', help='N ranks; one sleeps in forward')
    p.add_argument('--out', help='write the JSON here')
    args = p.parse_args(argv)
    if args.hang:
        return _hang(args)
    if args.quick:
        args.ranks, args.node_sizes, args.iters = [4], [2], 30
    rows = []
    for n in args.ranks:
        print(f'[scale_sim] {n} ranks ...', file=sys.stderr, flush=True)
        rows.append(summarize(simulate(n, args.node_sizes, iters=args.iters,
                                       interval=args.interval)))
        if 'failed' in rows[-1]:
            print(json.dumps(rows[-1], indent=2, default=str))
            return 1
    out = dict(measured=rows, model=_model(rows, args))
    print(table(out))
    if args.out:
        write_json(args.out, out)
    return 0


def _model(rows, args):
    """The model fitted on the measured runs and shown beside each, then at the model's rank
    counts with one core per rank (no contention) and --hop-node-us between nodes."""
    fitted = fit(rows)
    hop, crowd = fitted['hop_ms'], fitted['contention_ms']
    beside = [dict(predict(r['ranks'], r['nodes'][0], hop, hop, args.interval, crowd),
                   measured_tree_ms=r['times_ms']['exchange_tree_max'],
                   measured_ring_ms=r['times_ms']['exchange_ring_max']) for r in rows]
    beyond = [predict(n, args.model_node_size, hop, args.hop_node_us / 1000, args.model_interval)
              for n in args.model_ranks]
    return dict(fit=fitted, hop_node_ms=args.hop_node_us / 1000, node_size=args.model_node_size,
                interval_s=args.model_interval, beside=beside, beyond=beyond)


def table(out) -> str:
    lines = ['| ranks (nodes) | store requests/s per rank, idle / stepping (max) | store bytes/s '
             'per rank, idle / stepping (max) | collectives per step per rank | messages per step '
             'per rank, mean / max | bytes per step per rank, mean / max | exchange ms: ring '
             '(before) / tree (now) | step ms |',
             '|---|---|---|---|---|---|---|---|']
    for r in out['measured']:
        s, c, t = r['store_per_rank'], r['per_step_per_rank'], r['times_ms']
        lines.append(
            f"| {r['ranks']} ({len(r['nodes'])}) | {s['idle_req_s']['max']:.1f} / "
            f"{s['step_req_s']['max']:.1f} | {s['idle_bytes_s']['max']:.0f} / "
            f"{s['step_bytes_s']['max']:.0f} | {c['collectives']['max']:.2f} | "
            f"{c['messages']['mean']:.2f} / {c['messages']['max']:.0f} | "
            f"{c['bytes']['mean']:.1f} / {c['bytes']['max']:.0f} | "
            f"{t['exchange_ring_max']:.2f} / {t['exchange_tree_max']:.2f} | "
            f"{t['step_median_max']:.1f} |")
    m = out['model']
    lines += ['', f"model: one hop {m['fit']['hop_ms'] * 1e3:.0f} us here and "
              f"{m['fit']['contention_ms'] * 1e3:.1f} us x ranks**2 of contention (both fitted on "
              f"the runs above); beyond: no contention, {m['node_size']} ranks per node, "
              f"{m['hop_node_ms'] * 1e3:.0f} us per hop between nodes (assumed), the watchdog "
              f"every {m['interval_s']:g} s",
              '| ranks | tree ms (model / measured) | ring ms (model / measured) | '
              'store req/s per rank (now / before) |', '|---|---|---|---|']
    for b in m['beside']:
        lines.append(f"| {b['ranks']} | {b['tree_ms']:.2f} / {b['measured_tree_ms']:.2f} | "
                     f"{b['ring_ms']:.2f} / {b['measured_ring_ms']:.2f} | "
                     f"{b['store_requests_per_rank_s']:.0f} / "
                     f"{b['store_requests_per_rank_s_before']:.0f} |")
    for b in m['beyond']:
        lines.append(f"| {b['ranks']} (model) | {b['tree_ms']:.2f} | {b['ring_ms']:.2f} | "
                     f"{b['store_requests_per_rank_s']:.0f} / "
                     f"{b['store_requests_per_rank_s_before']:.0f} |")
    return '\n'.join(lines)


def stall() -> None:
    """What the stuck rank runs: user code, as a model's forward is."""
    time.sleep(3600)  # the line the hang report must name


def _hang(args) -> int:
    stuck = (args.hang // 2 + 1, 8)
    run = simulate(args.hang, args.node_sizes, iters=20, interval=0.5, stuck=stuck, stall=stall,
                   hang_timeout=5.0, rounds=1, timeout_s=300)
    report = run['hang_report'] or ''
    print(report)
    line = stall.__code__.co_firstlineno + 2
    named = (f'STRAGGLER: rank {stuck[0]} is in train_step (iteration {stuck[1]}) at '
             f'{__file__}:{line} in stall' in report)
    print(f'[scale_sim] {args.hang} ranks, rank {stuck[0]} stuck at iteration {stuck[1]}: '
          f'{"named" if named else "NOT named"}', file=sys.stderr)
    if args.out:
        write_json(args.out, dict(ranks=args.hang, stuck=stuck, report=report, named=named))
    return 0 if named else 1


if __name__ == '__main__':
    sys.exit(main())
