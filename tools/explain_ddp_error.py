#!/usr/bin/env python
"""Explain DDP errors in a saved log by parameter name, offline: no GPU, no process group, no data.

    python tools/explain_ddp_error.py CONFIG LOG_OR_TEXT [--cfg-options k=v ...] [--json]
    python tools/explain_ddp_error.py CONFIG - < train.log

Builds the config's model on CPU, reproduces DDP's reducer parameter order (frozen, tied and
root-level parameters, DDP-ignored ones from the model, --ignore or a DDPAutoTuneHook report) and names
every index of every rank's "Parameter indices which did not receive grad" line.

Exit codes: 0 explained; 1 no DDP message recognised in the text; 2 bad input (config, model,
or indices past the end of the model's reducer list).
"""
# isort: off
import _venv  # noqa: F401 - first: re-runs the tool under the project's .venv if needed
# isort: on
import argparse
import json
import os
import sys

from mmengine.config import DictAction


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('config', help='the training config (the one that raised)')
    p.add_argument('log', help='a log file, or - for standard input, or the message text itself')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                   help='config overrides used for the failing run (key=value)')
    p.add_argument('--ignore', nargs='+', default=[],
                   help='parameter names that were DDP-ignored in the failing run')
    p.add_argument('--report', help='ddp_usage_report.json of DDPAutoTuneHook: its ignored and '
                                    'frozen parameters are applied')
    p.add_argument('--json', action='store_true', help='machine-readable output')
    return p.parse_args(argv)


def read_text(arg: str) -> str:
    if arg == '-':
        return sys.stdin.read()
    if os.path.exists(arg):
        with open(arg, errors='replace') as f:
            return f.read()
    return arg


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmddp_hooks.branches import CONFIG_KEY, parse_branches, resolve_branches
    from mmddp_hooks.explain import describe_rank, explain_text, name_indices, parse_unused_lines
    from mmddp_hooks.model_from_config import build_model, load_config
    from mmddp_hooks.reducer_params import ignore_keys_for, reducer_params

    text = read_text(args.log)
    try:
        cfg = load_config(args.config, args.cfg_options)
        model = build_model(cfg)
        ignore = list(args.ignore)
        if args.report:
            with open(args.report) as f:
                plan = json.load(f)['plan']
            ignore += plan.get('ignore', [])
            for name in plan.get('freeze', []):
                dict(model.named_parameters())[name].requires_grad_(False)
        keys = list(getattr(model, '_ddp_params_and_buffers_to_ignore', []))
        keys += ignore_keys_for(model, ignore)
        params = reducer_params(model, keys)
        cfg_branches = resolve_branches(parse_branches(cfg.get(CONFIG_KEY), cfg), model)
        owners = {n: f'{b.name}: {b.describe_flag()}' for b in cfg_branches for n in b.resolved}
    except Exception as e:  # any failure to reproduce the model is the user's input, named
        print(f'error: cannot build the model of {args.config}: {type(e).__name__}: {e}',
              file=sys.stderr)
        return 2
    result = explain_text(text, params, owners)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for line in parse_unused_lines(text):
            print('\n'.join(describe_rank(name_indices(line, params, owners))))
        if result['fixes']:
            print('Fixes:\n' + '\n'.join(f'  - {fix}' for fix in result['fixes']))
        for other in result['other']:
            print(f"{other['message']}: {other['fix']}")
        if not result['unused'] and not result['other']:
            print('no DDP error message recognised in the text', file=sys.stderr)
    if any(r['unknown_indices'] for r in result['unused']):
        return 2
    return 0 if result['unused'] or result['other'] else 1


if __name__ == '__main__':
    sys.exit(main())
