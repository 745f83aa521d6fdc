#!/usr/bin/env python
"""Train with an MMEngine config, OpenMMLab style, on GPUs or on CPU (gloo) for dry runs.

    python tools/train.py CONFIG [--work-dir DIR] [--resume] [--cfg-options k=v ...]
                             [--synthetic [H W]] [--iters N] [--trust-checkpoint FILE ...]
    bash tools/dist_train.sh CONFIG NPROC [args]      # torchrun, one or several nodes

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
                   help='segmentation configs: train on random images/masks (optionally of '
                        'size H W instead of crop_size), no val/test: a dry run without data')
    p.add_argument('--iters', type=int, help='with --synthetic: number of training iterations')
    p.add_argument('--trust-checkpoint', action='append', default=[], metavar='FILE',
                   help='load this one checkpoint (path or URL) with full unpickling, which can run '
                        'code from it; every other checkpoint is loaded weights-only')
    p.add_argument('--launcher', choices=['none', 'pytorch'], default=None,
                   help='job launcher (default: pytorch under torchrun, else none)')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = p.parse_args(argv)
    if args.launcher is None:
        args.launcher = 'pytorch' if 'RANK' in os.environ else 'none'
    return args


def build_cfg(args) -> Config:
    import mmddp_hooks  # noqa: F401 - registers the wrapper and hooks

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    if args.synthetic is not None:
        from mmddp_hooks.mmseg import use_synthetic_data

        use_synthetic_data(cfg, img_size=args.synthetic or None, max_iters=args.iters)
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    if args.resume:
        cfg.resume = True
        cfg.load_from = None
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.launcher != 'none' and cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(type='ReconfigurableDDP',
                                     find_unused_parameters=cfg.get('find_unused_parameters',
                                                                    False))
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from mmddp_hooks.checkpoint import safe_checkpoint_loading, trusted_from
    from mmddp_hooks.dist import init_dist_if_needed, teardown

    if args.launcher == 'pytorch':
        init_dist_if_needed()
    cfg = build_cfg(args)
    runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
    with safe_checkpoint_loading(trusted_from(cfg, args.trust_checkpoint)):
        runner.train()
    del runner  # the last reference to the DDP wrapper: teardown can then join the gloo threads
    teardown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
