#!/usr/bin/env python
"""Dry-run a config's DDP behaviour on CPU before queueing for GPUs.

    python tools/ddp_doctor.py CONFIG [--nproc 2] [--iters 4] [--size H W] [--cfg-options k=v]
                                      [--real-data] [--pretrained] [--json] [--trust-checkpoint FILE]
    python tools/ddp_doctor.py CONFIG CONFIG ... | FOLDER | --list FILE   [same options]

Trains a few iterations on gloo CPU ranks and probes which parameters get gradients. The data is
synthetic, fed through the config's own train pipeline and dataset wrappers: only the innermost dataset
and the loading steps are replaced (or the config's own data with --real-data). --size H W scales the
pipeline's pixel sizes so the train size fits in HxW. Pretrained weights that are not on this machine
are not loaded (usage does not depend on them) unless --pretrained. Prints the usage report, whether
the config as written crashes under DDP (judged on the settings MMEngine applies: a top-level key
MMEngine ignores is printed as a warning, not used), the plan DDPAutoTuneHook would choose and the
config lines to paste.

Exit codes: 0 the config as written trains under DDP; 1 it would crash with DDP's unused-parameter
error; 2 the doctor could not run it (the error of every rank is printed; where the model cannot
train at --size, the smallest size that does); 3 its ranks hang: one made no progress for
--hang-timeout seconds (default: 20x the slowest step, at least 120 s), and the report says which
rank is stuck at which line and what the others wait in. A rank that finished and reported, then
died while exiting, is printed as a teardown fault and leaves the verdict as it is.

Several configs (or a folder, searched recursively, or a --list file of config paths) make a zoo run:
each is diagnosed in turn and one summary table is printed (a JSON list with --json); a config that
cannot train at --size is run again at the smallest size that does; --out FILE writes the table
there too, clear of the logs. Exit code 0 when every config was diagnosed, 2 when one could not run.
"""
# isort: off
import _venv  # noqa: F401 - first: re-runs the tool under the project's .venv if needed
# isort: on
import argparse
import glob
import json
import os
import re
import sys
import time
from typing import List, Optional

from mmengine.config import DictAction

from mmddp_hooks import doctor
from mmddp_hooks.doctor import CRASHES, FAILED, HANGS, OK
from mmddp_hooks.model_from_config import config_path
from mmddp_hooks.report import DYNAMIC, NEVER, RANK_FIXED


def _effective(settings: dict) -> str:
    """The settings MMEngine applies, with where they come from: what the verdict is about."""
    text = (f"find_unused_parameters={settings['find_unused_parameters']} "
            f"({settings['find_unused_parameters_from']})")
    if settings['static_graph']:
        text += ', static_graph=True (model_wrapper_cfg)'
    return text


def _no_synthetic_data(config: str, cfg_options: Optional[dict]) -> Optional[str]:
    """Why the config cannot take synthetic data (its task, or a loading step without a stand-in),
    or None: checked once, here, before the ranks start, as each rank would fail on it. A config
    that does not load is left to the ranks, whose errors the doctor reports."""
    from mmddp_hooks.model_from_config import load_config
    from mmddp_hooks.synthetic import SyntheticDataUnsupported, use_synthetic

    try:
        cfg = load_config(config, cfg_options)
    except Exception:
        return None
    try:
        use_synthetic(cfg, max_iters=1)
    except SyntheticDataUnsupported as err:
        return str(err)
    return None


def _verdict(out: dict) -> str:
    if out['status'] == CRASHES:
        return f"CRASHES under DDP: {out['crash_reason']}"
    if out['crashes_without_hook']:
        return 'trains, thanks to its DDPAutoTuneHook (plain DDP would crash)'
    return 'trains under DDP as written'


def _print_one(config: str, out: dict) -> None:
    if out['status'] == HANGS:
        print(f"ddp_doctor: {config} HANGS under DDP:\n{out['hang_report']}")
        return
    if out['status'] == FAILED:
        hint = out.get('size_hint')
        print(f"ddp_doctor: could not run {config}:\n"
              + (f"{hint['message']}\n" if hint else '') + out['error'], file=sys.stderr)
        return
    print(f"data: {out['data']}")
    if out['dropped_weights']:
        print('pretrained weights not on this machine, not loaded (parameter usage does not depend '
              f"on them; --pretrained loads them): {', '.join(out['dropped_weights'])}")
    for note in out['cpu_notes']:
        print(f'cpu dry run: {note}')
    for bug in out['upstream_bugs']:
        print(f'known upstream bug, worked around in the dry run: {bug}')
    print(out['table'])
    print(f'config as written runs DDP with {_effective(out["settings"])}: {_verdict(out)}')
    for note in out['dropped']:
        print(f'warning: {note}')
    print(f'DDPAutoTuneHook would choose: {out["auto_summary"]}')
    for reason in out['auto']['reasons']:
        print(f'  - {reason}')
    print('paste into the config:\n' + out['config_lines'])
    if out['teardown_fault']:
        print('ddp_doctor: the verdict stands (every rank finished and reported), but a rank died '
              f"while exiting afterwards (a teardown fault, not the config's):\n"
              f"{out['teardown_fault']}", file=sys.stderr)


def _configs(paths: List[str], listed: Optional[str]) -> List[str]:
    """The configs of a zoo run: files as given, folders searched for ``*.py`` (``_base_`` and
    ``_*`` files left out), then the paths of a --list file (one a line, ``#`` comments); a
    ``PACKAGE::PATH`` names a config shipped with an installed package."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            found += sorted(f for f in glob.glob(os.path.join(path, '**', '*.py'), recursive=True)
                            if '_base_' not in f and not os.path.basename(f).startswith('_'))
        else:
            found.append(path)
    if listed:
        with open(listed) as f:
            found += [line.split('#')[0].strip() for line in f if line.split('#')[0].strip()]
    return [config_path(path) for path in found]


STATUS = {OK: 'OK', CRASHES: 'CRASHES', FAILED: 'could not run', HANGS: 'HANGS'}


EXCEPTION = re.compile(r'^[\w.]*(Error|Exception|Interrupt|StopIteration)\b')
# what the other ranks say when one died: never the cause
PEER_LOST = ('Connection closed by peer', 'Connection reset by peer', 'stopped watching')


def _cause(error: str) -> str:
    """The first exception line of the ranks' output that is not a lost peer, else the last one."""
    found = [line.strip() for line in error.splitlines() if EXCEPTION.match(line.strip())]
    own = [line for line in found if not any(p in line for p in PEER_LOST)]
    return ((own or found or [error.strip().splitlines()[-1] if error.strip() else 'no output'])
            [0])[:400]


def _row(config: str, out: dict, seconds: float, note: str) -> dict:
    """One zoo table row: what the doctor found, or why it could not run."""
    row = dict(config=config, status=STATUS[out['status']], seconds=round(seconds, 1), size=note)
    if out['status'] == FAILED:
        hint = out.get('size_hint')
        row['why'] = hint['message'] if hint else _cause(out['error'])
        return row
    if out['status'] == HANGS:
        row['why'] = out['hang_report'].splitlines()[0]
        return row
    counts = out['report']['counts']
    row.update(settings=_effective(out['settings']), never=counts[NEVER],
               rank_dependent=counts[RANK_FIXED], dynamic=counts[DYNAMIC],
               verdict=_verdict(out), plan=out['auto_summary'])
    return row


def _table(rows: List[dict]) -> str:
    head = ('config', 'effective settings', 'never', 'rank-dep.', 'dynamic', 'verdict', 'plan',
            'seconds')
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        name = os.path.splitext(os.path.basename(r['config']))[0] + \
            (f" ({r['size']})" if r['size'] else '')
        if 'why' in r:
            cells = (name, '', '', '', '', f"{r['status']}: {r['why']}", '', r['seconds'])
        else:
            cells = (name, r['settings'], r['never'], r['rank_dependent'], r['dynamic'],
                     r['verdict'], r['plan'], r['seconds'])
        lines.append('| ' + ' | '.join(str(c).replace('|', '/') for c in cells) + ' |')
    return '\n'.join(lines)


def _zoo(configs: List[str], args, run) -> int:
    rows = []
    for config in configs:
        start, note = time.monotonic(), ''
        try:
            unsupported = None if args.real_data else _no_synthetic_data(config, args.cfg_options)
            if unsupported:
                out = dict(status=FAILED, error=unsupported)
            else:
                out = run(config, args.size)
                hint = out.get('size_hint')
                if out['status'] == FAILED and hint:
                    note = (f"{hint['smallest'][0]}x{hint['smallest'][1]}: "
                            f"{args.size[0]}x{args.size[1]} too small")
                    out = run(config, hint['smallest'])
        except Exception as err:  # a config that does not even load: its row says why
            out = dict(status=FAILED, error=f'{type(err).__name__}: {err}')
        rows.append(_row(config, out, time.monotonic() - start, note))
        print(f"ddp_doctor: {config}: {rows[-1]['status']} ({rows[-1]['seconds']} s)",
              file=sys.stderr, flush=True)
    text = json.dumps(rows, indent=2) if args.json else _table(rows)
    print(text)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text + '\n')
    return FAILED if any(r['status'] == STATUS[FAILED] for r in rows) else OK


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('config', nargs='*', help='a config; several, or a folder: a zoo run')
    p.add_argument('--list', metavar='FILE', help='a file of config paths, one a line: a zoo run')
    p.add_argument('--nproc', type=int, default=2, help='CPU ranks (gloo)')
    p.add_argument('--iters', type=int, default=4, help='iterations to probe')
    p.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'),
                   help="scale the train pipeline's pixel sizes so the train size fits in HxW")
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default=None)
    p.add_argument('--real-data', action='store_true', help="use the config's own dataloader")
    p.add_argument('--pretrained', action='store_true',
                   help='load pretrained weights that are not on this machine (downloads)')
    p.add_argument('--timeout', type=float, default=600.0, help='seconds before the ranks are killed')
    p.add_argument('--hang-timeout', type=float, metavar='SECONDS',
                   help='seconds without progress on a rank that make the verdict HANGS '
                        '(default, or 0: 20x the slowest step, at least 120 s)')
    p.add_argument('--json', action='store_true')
    p.add_argument('--out', metavar='FILE',
                   help='zoo run: also write the table (or the JSON) to FILE, without the logs')
    p.add_argument('--trust-checkpoint', action='append', default=[], metavar='FILE',
                   help='load this one checkpoint (e.g. init_cfg pretrained weights) with full '
                        'unpickling; every other checkpoint is loaded weights-only')
    args = p.parse_args(argv)
    configs = _configs(args.config, args.list)
    if not configs:
        p.error('give a config, several, a folder or --list FILE')

    def run(config: str, size: Optional[List[int]]) -> dict:
        return doctor.run_doctor(config, args.nproc, args.iters, size, args.cfg_options,
                                 synthetic=not args.real_data, timeout=args.timeout,
                                 trusted=args.trust_checkpoint, hang_timeout=args.hang_timeout,
                                 pretrained=args.pretrained)

    if len(configs) > 1 or args.list or os.path.isdir(args.config[0]):
        return _zoo(configs, args, run)
    unsupported = None if args.real_data else _no_synthetic_data(configs[0], args.cfg_options)
    if unsupported:
        print(f'ddp_doctor: {unsupported}', file=sys.stderr)
        return FAILED
    out = run(configs[0], args.size)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print_one(configs[0], out)
    return out['status']


if __name__ == '__main__':
    sys.exit(main())
