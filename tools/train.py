#!/usr/bin/env python
"""Train with an MMEngine config, OpenMMLab style, on GPUs or on CPU (gloo) for dry runs.

    python tools/train.py CONFIG [--work-dir DIR] [--resume] [--cfg-options k=v ...]
                             [--synthetic [H W]] [--iters N] [--trust-checkpoint FILE ...]
    bash tools/dist_train.sh CONFIG NPROC [args]      # torchrun, one or several nodes
    bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG [WORK_DIR] [args]   # srun, --launcher slurm

What differs from mmseg's tools/train.py: the process group comes from
``mmddp_hooks.dist.init_dist_if_needed`` (gloo without a GPU, no CUDA call), a distributed run without
``model_wrapper_cfg`` gets ``ReconfigurableDDP`` (which drops ``device_ids`` on CPU and reverts SyncBN to
BN there), every checkpoint is loaded weights-only with exactly MMEngine's own types allowed (so resume
works under torch >= 2.6 and no checkpoint runs code; ``--trust-checkpoint FILE`` or the config's
``trusted_checkpoints`` lifts that for one named file), and the process group is torn down with a
barrier first.
"""
# isort: off
import _venv  # noqa: F401 - first: re-runs the tool under the project's .venv if needed
# isort: on
import argparse
import contextlib
import os
import os.path as osp
import sys

from mmengine.config import Config, DictAction


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Train a model (CPU gloo or GPU)')
    p.add_argument('config', help='train config file path')
    p.add_argument('--work-dir', help='the dir to save logs and models')
    p.add_argument('--resume', action='store_true', help='resume from the latest checkpoint')
    p.add_argument('--amp', action='store_true', help='automatic mixed precision (GPU)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override settings of the config, key=value')
    p.add_argument('--synthetic', nargs='*', type=int, metavar='H W', default=None,
                   help='segmentation and detection configs: train on random images with masks or '
                        'boxes (optionally of size H W instead of the config\'s), no val/test: a dry '
                        'run without data')
    p.add_argument('--iters', type=int,
                   help='train this many iterations (an epoch-based loop becomes iteration-based, '
                        'validating once at the end; --synthetic switches validation off)')
    p.add_argument('--trust-checkpoint', action='append', default=[], metavar='FILE',
                   help='load this one checkpoint (path or URL) with full unpickling, which can run '
                        'code from it; every other checkpoint is loaded weights-only')
    p.add_argument('--hang-timeout', type=float, metavar='SECONDS',
                   help='add HangWatchdogHook: when a rank makes no progress for SECONDS, every '
                        "rank ends with a report of which rank is stuck where (0: the hook's "
                        'default timeout, derived from the step times)')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default=None,
                   help='job launcher (default: pytorch under torchrun, else none; '
                        'tools/slurm_train.sh passes slurm)')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = p.parse_args(argv)
    if args.launcher is None:
        args.launcher = 'pytorch' if 'RANK' in os.environ else 'none'
    return args


def limit_iters(cfg: Config, max_iters: int) -> None:
    """``--iters N`` on the config's own data: train N iterations, validation and testing kept.

    An iteration-based loop keeps everything but ``max_iters`` (it validates at its last iteration
    anyway). Any other loop (epoch-based, or none) becomes the dry runs' iteration loop of
    ``train_only`` (logging and checkpoints by iteration), with the config's validation and testing
    put back and run once, at iteration N: an epoch-based ``val_interval`` would mean every iteration.
    """
    from mmddp_hooks.model_from_config import train_only

    if 'max_iters' in (cfg.get('train_cfg') or {}):
        cfg.train_cfg.max_iters = max_iters
        return
    kept = {k: cfg[k] for k in cfg.keys() if k.startswith(('val_', 'test_'))}
    train_only(cfg, max_iters)
    for key, value in kept.items():
        cfg[key] = value
    cfg.train_cfg.val_interval = max_iters


def build_cfg(args) -> Config:
    import mmddp_hooks  # noqa: F401 - registers the wrapper and hooks

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    if args.synthetic is not None:
        from mmddp_hooks.synthetic import use_synthetic

        use_synthetic(cfg, img_size=args.synthetic or None, max_iters=args.iters)
    elif args.iters is not None:
        limit_iters(cfg, args.iters)
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    if args.resume:
        cfg.resume = True
        cfg.load_from = None
    if args.hang_timeout is not None:
        cfg.custom_hooks = [h for h in cfg.get('custom_hooks', [])
                            if h.get('type') != 'HangWatchdogHook'] + [dict(
                                type='HangWatchdogHook', timeout=args.hang_timeout or None,
                                action='abort')]
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.launcher != 'none' and cfg.get('model_wrapper_cfg') is None:
        # MMEngine would pass the top-level key to DDP; it moves into the wrapper's config, so the
        # run's config (and the hook's report of it) names one setting, not an ignored twin
        cfg.model_wrapper_cfg = dict(type='ReconfigurableDDP',
                                     find_unused_parameters=cfg.pop('find_unused_parameters',
                                                                    False))
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmengine.dist import get_rank
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from mmddp_hooks.checkpoint import safe_checkpoint_loading, trusted_from
    from mmddp_hooks.dist import init_dist_if_needed, teardown
    from mmddp_hooks.synthetic import SyntheticDataUnsupported, pipeline_errors_named

    if args.hang_timeout is not None:  # NCCL's flight recorder, unless the user set it up
        os.environ.setdefault('TORCH_NCCL_TRACE_BUFFER_SIZE', '2000')
        os.environ.setdefault('TORCH_NCCL_DUMP_ON_TIMEOUT', '1')
    if args.launcher != 'none':
        init_dist_if_needed(launcher=args.launcher)
    try:
        cfg = build_cfg(args)
    except SyntheticDataUnsupported as err:
        rank = get_rank()
        teardown()  # every rank read the same config and stops here
        if rank == 0:
            print(f'train.py: {err}', file=sys.stderr)
        return 2
    runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
    named = pipeline_errors_named() if args.synthetic is not None else contextlib.nullcontext()
    with named, safe_checkpoint_loading(trusted_from(cfg, args.trust_checkpoint)):
        runner.train()
    del runner  # the last reference to the DDP wrapper: teardown can then join the gloo threads
    teardown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
