#!/usr/bin/env python
"""Check a config's DDP settings and declared branches without training.

    python tools/check_config.py CONFIG [--cfg-options k=v ...] [--build] [--json]

Reads find_unused_parameters, model_wrapper_cfg, sync_bn, launcher and ddp_branches (flag paths must
exist and be booleans; with --build the model is built on CPU and every module/parameter pattern must
match, without overlaps). Exit codes: 0 no error (warnings allowed), 1 errors.
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
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default=None)
    p.add_argument('--build', action='store_true', help='build the model on CPU and match patterns')
    p.add_argument('--json', action='store_true')
    args = p.parse_args(argv)
    from mmddp_hooks.config_check import check_config

    result = check_config(args.config, args.cfg_options, build=args.build)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        for b in result['branches']:
            size = f", {b['n_params']} params" if b['n_params'] is not None else ''
            print(f"branch {b['name']}: {b['flag']}={b['enabled']}{size}")
        for w in result['warnings']:
            print(f'warning: {w}')
        for e in result['errors']:
            print(f'error: {e}', file=sys.stderr)
        print(f"{args.config}: {len(result['errors'])} errors, {len(result['warnings'])} warnings")
    return 1 if result['errors'] else 0


if __name__ == '__main__':
    sys.exit(main())
