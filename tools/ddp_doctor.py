#!/usr/bin/env python
"""Dry-run a config's DDP behaviour on CPU before queueing for GPUs.

    python tools/ddp_doctor.py CONFIG [--nproc 2] [--iters 4] [--size H W] [--batch-size N]
                                      [--cfg-options k=v] [--real-data [--subset K]] [--pretrained]
                                      [--json] [--debug] [--trust-checkpoint FILE]
    python tools/ddp_doctor.py CONFIG CONFIG ... | FOLDER | --list FILE   [same options]

Trains a few iterations on gloo CPU ranks and probes which parameters get gradients. The data is
synthetic, fed through the config's own train pipeline and dataset wrappers: only the innermost dataset
and the loading steps are replaced; or the batches of the config's own builder
(ddp_doctor = dict(synthetic_batch='my_pkg.make_batch')); or the config's own data with --real-data
(--subset K: its first K samples). --size H W scales the pipeline's pixel sizes so the train size fits
in HxW. Each rank takes a batch of --batch-size (default: the config's, lowered to 2, never raised;
0 keeps the config's). Pretrained weights that are
not on this machine are not loaded (usage does not depend on them) unless --pretrained. The current
folder is put on sys.path, as tools/dist_train.sh puts the repository root on PYTHONPATH. Prints the
usage report (with the batch kinds seen and the zero-weighted terms that keep parameters "used"),
whether the config as written crashes under DDP (judged on the settings MMEngine applies: a
top-level key MMEngine ignores is printed as a warning, not used), the plan DDPAutoTuneHook would
choose and the config lines to paste.

Exit codes: 0 the config as written trains under DDP; 1 it would crash with DDP's unused-parameter
error; 2 the doctor stopped before a verdict: one paragraph names the stage (loading the config,
building the model, setting up the visualizer and loggers, building the data, building the optimizer,
running the hooks before training, running), the cause and what to do (where the model cannot
train at --size, the smallest size that does); a rank's own error comes first, each other rank's
different one after it, and the ranks that only lost a peer last; --debug adds every rank's
traceback; 3 its ranks
hang: one made no progress for --hang-timeout seconds (default: 20x the slowest step, at least
120 s), and the report says which rank is stuck at which line and what the others wait in. A rank
that finished and reported, then died while exiting, is printed as a teardown fault and leaves the
verdict as it is. --json prints one JSON object, whatever happens (``status``: the exit code;
``stage`` and ``error`` when it stopped).

Several configs (or a folder, searched recursively, or a --list file of config paths) make a zoo run:
each is diagnosed in turn and one summary table is printed (with --json, an object whose ``configs``
are the rows); a config that
cannot train at --size is run again at the smallest size that does; --out FILE writes the table
there too, clear of the logs. Exit code 0 when every config was diagnosed, 2 when one could not run.
"""
# isort: off
import _venv  # noqa: F401 - first: re-runs the tool under the project's .venv if needed
# isort: on
import argparse
import contextlib
import glob
import json
import os
import sys
import time
import traceback
from typing import Iterator, List, Optional

from mmengine.config import DictAction

from mmddp_hooks import doctor
from mmddp_hooks.doctor import CRASHES, FAILED, HANGS, OK, VERDICTS
from mmddp_hooks.doctor_failure import cause_line, classify, paragraph
from mmddp_hooks.model_from_config import config_path
from mmddp_hooks.report import DYNAMIC, NEVER, RANK_FIXED


def _effective(settings: dict) -> str:
    """The settings MMEngine applies, with where they come from: what the verdict is about."""
    text = (f"find_unused_parameters={settings['find_unused_parameters']} "
            f"({settings['find_unused_parameters_from']})")
    if settings['static_graph']:
        text += ', static_graph=True (model_wrapper_cfg)'
    return text


def _verdict(out: dict) -> str:
    if out['status'] == CRASHES:
        return f"CRASHES under DDP: {out['crash_reason']}"
    if out['crashes_without_hook']:
        return 'trains, thanks to its DDPAutoTuneHook (plain DDP would crash)'
    late = out.get('wrap_time')
    if late and late['frozen'] and out['asked_find_unused'] and not out['has_hook']:
        return (f"trains under DDP as written, because of find_unused_parameters=True: "
                f"{len(late['frozen'])} parameters DDP registered at the wrap are frozen "
                'afterwards (with False it would crash at iteration 2)')
    return 'trains under DDP as written'


def _print_one(config: str, out: dict, debug: bool = False) -> None:
    if out['status'] == HANGS:
        print(f"ddp_doctor: {config} HANGS under DDP:\n{out['hang_report']}")
        return
    if out['status'] == FAILED:
        print(out['error'], file=sys.stderr)
        if debug and out.get('details'):
            print(f"--- every rank's output (--debug):\n{out['details']}", file=sys.stderr)
        return
    print(f"data: {out['data']}")
    if out.get('batch'):
        print(f"batch: {out['batch']}")
    if out['dropped_weights']:
        print('pretrained weights not on this machine, not loaded (parameter usage does not depend '
              f"on them; --pretrained loads them): {', '.join(out['dropped_weights'])}")
    for note in out['cpu_notes']:
        print(f'cpu dry run: {note}')
    for bug in out['upstream_bugs']:
        print(f'known upstream bug, worked around in the dry run: {bug}')
    for why in out.get('probe_log', []):
        print(f'probe: {why}')
    if out.get('wrap_time_text'):
        print(out['wrap_time_text'])
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


def _stopped(failure: dict, details: str = '') -> dict:
    """The doctor's answer for a run that stopped before a verdict."""
    return dict(status=FAILED, verdict=VERDICTS[FAILED], stage=failure['stage'], failure=failure,
                error=paragraph(failure), details=details)


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


def _row(config: str, out: dict, seconds: float, note: str) -> dict:
    """One zoo table row: what the doctor found, or why it could not run."""
    row = dict(config=config, status=STATUS[out['status']], seconds=round(seconds, 1), size=note)
    if out['status'] == FAILED:
        hint = out.get('size_hint')
        failure = out.get('failure')
        row['why'] = hint['message'] if hint else (
            f"{failure['stage']}: {failure['cause']}" if failure else cause_line(out['error']))
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
            stop = doctor.preflight(config, args.cfg_options, not args.real_data, args.subset)
            if stop:
                out = _stopped(stop)
            else:
                out = run(config, args.size)
                hint = out.get('size_hint')
                if out['status'] == FAILED and hint:
                    note = (f"{hint['smallest'][0]}x{hint['smallest'][1]}: "
                            f"{args.size[0]}x{args.size[1]} too small")
                    out = run(config, hint['smallest'])
        except Exception as err:  # what the doctor did not expect: its row says why
            out = _stopped(classify(err, doctor.RUNNING, config))
        rows.append(_row(config, out, time.monotonic() - start, note))
        print(f"ddp_doctor: {config}: {rows[-1]['status']} ({rows[-1]['seconds']} s)",
              file=sys.stderr, flush=True)
    status = FAILED if any(r['status'] == STATUS[FAILED] for r in rows) else OK
    text = json.dumps(dict(status=status, configs=rows), indent=2) if args.json else _table(rows)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text + '\n')
    return status, text


@contextlib.contextmanager
def _stdout_to_stderr(on: bool) -> Iterator[None]:
    """With --json, everything but the JSON object (logs of the in-process checks, native prints)
    goes to stderr, so stdout holds one JSON object."""
    if not on:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _on_path_here() -> None:
    """The current folder on sys.path (and so on the ranks' PYTHONPATH), as ``python -m`` and
    tools/dist_train.sh (the repository root) have it: a config's own packages import from it."""
    here = os.getcwd()
    if here not in (os.path.abspath(p or '.') for p in sys.path):
        sys.path.insert(0, here)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('config', nargs='*', help='a config; several, or a folder: a zoo run')
    p.add_argument('--list', metavar='FILE', help='a file of config paths, one a line: a zoo run')
    p.add_argument('--nproc', type=int, default=2, help='CPU ranks (gloo)')
    p.add_argument('--iters', type=int, default=4,
                   help='iterations to probe (more while batch kinds are rarely seen)')
    p.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'),
                   help="scale the train pipeline's pixel sizes so the train size fits in HxW")
    p.add_argument('--batch-size', type=int, metavar='N',
                   help=f"per-rank batch (default: the config's, at most {doctor.BATCH_SIZE} on CPU; "
                        "0 keeps the config's)")
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default=None)
    p.add_argument('--real-data', action='store_true', help="use the config's own dataloader")
    p.add_argument('--subset', type=int, metavar='K',
                   help="with --real-data: the first K samples of the config's own dataset")
    p.add_argument('--pretrained', action='store_true',
                   help='load pretrained weights that are not on this machine (downloads)')
    p.add_argument('--timeout', type=float, default=600.0, help='seconds before the ranks are killed')
    p.add_argument('--hang-timeout', type=float, metavar='SECONDS',
                   help='seconds without progress on a rank that make the verdict HANGS '
                        '(default, or 0: 20x the slowest step, at least 120 s)')
    p.add_argument('--json', action='store_true', help='print one JSON object, whatever happens')
    p.add_argument('--debug', action='store_true',
                   help="on a failure, also print every rank's traceback and output")
    p.add_argument('--out', metavar='FILE',
                   help='zoo run: also write the table (or the JSON) to FILE, without the logs')
    p.add_argument('--trust-checkpoint', action='append', default=[], metavar='FILE',
                   help='load this one checkpoint (e.g. init_cfg pretrained weights) with full '
                        'unpickling; every other checkpoint is loaded weights-only')
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    configs = _configs(args.config, args.list)
    if not configs:
        p.error('give a config, several, a folder or --list FILE')
    _on_path_here()
    with _stdout_to_stderr(args.json):
        try:
            out = _diagnose(configs, args)
        except Exception as err:  # the doctor's own failure: still one paragraph, exit 2
            out = _stopped(classify(err, doctor.RUNNING, configs[0]), traceback.format_exc())
    if isinstance(out, tuple):  # a zoo run: its table or JSON, already written to --out
        print(out[1])
        return out[0]
    if out['status'] == FAILED and not args.debug:
        out.pop('details', None)  # tracebacks are for --debug
    if args.json:
        out.setdefault('verdict', VERDICTS[out['status']])
        print(json.dumps(out, indent=2, default=str))
    else:
        _print_one(configs[0], out, args.debug)
    return out['status']


def _diagnose(configs: List[str], args):
    def run(config: str, size: Optional[List[int]]) -> dict:
        return doctor.run_doctor(config, args.nproc, args.iters, size, args.cfg_options,
                                 synthetic=not args.real_data, timeout=args.timeout,
                                 trusted=args.trust_checkpoint, hang_timeout=args.hang_timeout,
                                 pretrained=args.pretrained, batch_size=args.batch_size,
                                 subset=args.subset)

    if len(configs) > 1 or args.list or os.path.isdir(args.config[0]):
        return _zoo(configs, args, run)
    stop = doctor.preflight(configs[0], args.cfg_options, not args.real_data, args.subset)
    if stop:
        return _stopped(stop)
    return run(configs[0], args.size)


if __name__ == '__main__':
    sys.exit(main())
