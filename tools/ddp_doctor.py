#!/usr/bin/env python
"""Dry-run a config's DDP behaviour on CPU before queueing for GPUs.

    python tools/ddp_doctor.py CONFIG [--nproc 2] [--iters 4] [--size H W] [--cfg-options k=v]
                                      [--real-data] [--json] [--trust-checkpoint FILE ...]

Trains a few iterations on gloo CPU ranks with synthetic images/masks of the config's shape (or the
config's own data with --real-data), probes which parameters get gradients, and prints the usage
report, whether the config as written crashes under DDP, the plan DDPAutoTuneHook would choose and
the config lines to paste.

Exit codes: 0 the config as written trains under DDP; 1 it would crash with DDP's unused-parameter
error; 2 the doctor could not run it (the error of every rank is printed). A rank that finished and
reported, then died while exiting, is printed as a teardown fault and leaves the verdict as it is.
"""
# isort: off
import _venv  # noqa: F401 - first: re-runs the tool under the project's .venv if needed
# isort: on
import argparse
import json
import sys

from mmengine.config import DictAction


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('config')
    p.add_argument('--nproc', type=int, default=2, help='CPU ranks (gloo)')
    p.add_argument('--iters', type=int, default=4, help='iterations to probe')
    p.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'), help='synthetic image size')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default=None)
    p.add_argument('--real-data', action='store_true', help="use the config's own dataloader")
    p.add_argument('--timeout', type=float, default=600.0, help='seconds before the ranks are killed')
    p.add_argument('--json', action='store_true')
    p.add_argument('--trust-checkpoint', action='append', default=[], metavar='FILE',
                   help='load this one checkpoint (e.g. init_cfg pretrained weights) with full '
                        'unpickling; every other checkpoint is loaded weights-only')
    args = p.parse_args(argv)
    from mmddp_hooks.doctor import CRASHES, FAILED, run_doctor

    out = run_doctor(args.config, args.nproc, args.iters, args.size, args.cfg_options,
                     synthetic=not args.real_data, timeout=args.timeout,
                     trusted=args.trust_checkpoint)
    if args.json:
        print(json.dumps(out, indent=2))
    elif out['status'] == FAILED:
        print(f"ddp_doctor: could not run {args.config}:\n{out['error']}", file=sys.stderr)
    else:
        if out['status'] == CRASHES:
            verdict = 'CRASHES under DDP: find_unused_parameters=False with unused parameters'
        elif out['crashes_without_hook']:
            verdict = 'trains, thanks to its DDPAutoTuneHook (plain DDP would crash)'
        else:
            verdict = 'trains under DDP as written'
        print(out['table'])
        print(f'config as written (find_unused_parameters={out["asked_find_unused"]}): {verdict}')
        print(f'DDPAutoTuneHook would choose: {out["auto_summary"]}')
        for reason in out['auto']['reasons']:
            print(f'  - {reason}')
        print('paste into the config:\n' + out['config_lines'])
    if out['status'] != FAILED and out['teardown_fault']:
        print('ddp_doctor: the verdict stands (every rank finished and reported), but a rank died '
              f"while exiting afterwards (a teardown fault, not the config's):\n"
              f"{out['teardown_fault']}", file=sys.stderr)
    return out['status']


if __name__ == '__main__':
    sys.exit(main())
