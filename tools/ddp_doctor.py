#!/usr/bin/env python
"""Dry-run a config's DDP behaviour on CPU before queueing for GPUs.

    python tools/ddp_doctor.py CONFIG [--nproc 2] [--iters 4] [--size H W] [--cfg-options k=v]
                                      [--real-data] [--json] [--trust-checkpoint FILE ...]

Trains a few iterations on gloo CPU ranks with synthetic images/masks of the config's shape (or the
config's own data with --real-data), probes which parameters get gradients, and prints the usage
report, whether the config as written crashes under DDP (judged on the settings MMEngine applies: a
top-level key MMEngine ignores is printed as a warning, not used), the plan DDPAutoTuneHook would
choose and the config lines to paste.

Exit codes: 0 the config as written trains under DDP; 1 it would crash with DDP's unused-parameter
error; 2 the doctor could not run it (the error of every rank is printed); 3 its ranks hang: one
made no progress for --hang-timeout seconds (default: 20x the slowest step, at least 120 s), and
the report says which rank is stuck at which line and what the others wait in. A rank that
finished and reported, then died while exiting, is printed as a teardown fault and leaves the
verdict as it is.
"""
# isort: off
import _venv  # noqa: F401 - first: re-runs the tool under the project's .venv if needed
# isort: on
import argparse
import json
import sys
from typing import Optional

from mmengine.config import DictAction


def _effective(settings: dict) -> str:
    """The settings MMEngine applies, with where they come from: what the verdict is about."""
    text = (f"find_unused_parameters={settings['find_unused_parameters']} "
            f"({settings['find_unused_parameters_from']})")
    if settings['static_graph']:
        text += ', static_graph=True (model_wrapper_cfg)'
    return text


def _no_synthetic_data(config: str, cfg_options: Optional[dict]) -> Optional[str]:
    """Why the config has no synthetic data, or None: checked once, here, before the ranks start,
    as each rank would fail on it with a traceback. A config that does not load is left to the
    ranks, whose errors the doctor reports."""
    from mmddp_hooks.model_from_config import load_config
    from mmddp_hooks.synthetic import SyntheticDataUnsupported, synthetic_task

    try:
        cfg = load_config(config, cfg_options)
    except Exception:
        return None
    try:
        synthetic_task(cfg)
    except SyntheticDataUnsupported as err:
        return str(err)
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('config')
    p.add_argument('--nproc', type=int, default=2, help='CPU ranks (gloo)')
    p.add_argument('--iters', type=int, default=4, help='iterations to probe')
    p.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'), help='synthetic image size')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default=None)
    p.add_argument('--real-data', action='store_true', help="use the config's own dataloader")
    p.add_argument('--timeout', type=float, default=600.0, help='seconds before the ranks are killed')
    p.add_argument('--hang-timeout', type=float, metavar='SECONDS',
                   help='seconds without progress on a rank that make the verdict HANGS '
                        '(default, or 0: 20x the slowest step, at least 120 s)')
    p.add_argument('--json', action='store_true')
    p.add_argument('--trust-checkpoint', action='append', default=[], metavar='FILE',
                   help='load this one checkpoint (e.g. init_cfg pretrained weights) with full '
                        'unpickling; every other checkpoint is loaded weights-only')
    args = p.parse_args(argv)
    from mmddp_hooks.doctor import CRASHES, FAILED, HANGS, run_doctor

    unsupported = None if args.real_data else _no_synthetic_data(args.config, args.cfg_options)
    if unsupported:
        print(f'ddp_doctor: {unsupported}', file=sys.stderr)
        return FAILED
    out = run_doctor(args.config, args.nproc, args.iters, args.size, args.cfg_options,
                     synthetic=not args.real_data, timeout=args.timeout,
                     trusted=args.trust_checkpoint, hang_timeout=args.hang_timeout)
    if args.json:
        print(json.dumps(out, indent=2))
    elif out['status'] == HANGS:
        print(f"ddp_doctor: {args.config} HANGS under DDP:\n{out['hang_report']}")
    elif out['status'] == FAILED:
        print(f"ddp_doctor: could not run {args.config}:\n{out['error']}", file=sys.stderr)
    else:
        if out['status'] == CRASHES:
            verdict = f"CRASHES under DDP: {out['crash_reason']}"
        elif out['crashes_without_hook']:
            verdict = 'trains, thanks to its DDPAutoTuneHook (plain DDP would crash)'
        else:
            verdict = 'trains under DDP as written'
        print(out['table'])
        print(f'config as written runs DDP with {_effective(out["settings"])}: {verdict}')
        for note in out['dropped']:
            print(f'warning: {note}')
        print(f'DDPAutoTuneHook would choose: {out["auto_summary"]}')
        for reason in out['auto']['reasons']:
            print(f'  - {reason}')
        print('paste into the config:\n' + out['config_lines'])
    if out['status'] not in (FAILED, HANGS) and out['teardown_fault']:
        print('ddp_doctor: the verdict stands (every rank finished and reported), but a rank died '
              f"while exiting afterwards (a teardown fault, not the config's):\n"
              f"{out['teardown_fault']}", file=sys.stderr)
    return out['status']


if __name__ == '__main__':
    sys.exit(main())
