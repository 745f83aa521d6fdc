"""One 2-rank launch per mmdet or mmpretrain config: plain DDP as the config writes it, plain DDP
with ``find_unused_parameters=True`` where that crashes, and with the hook, each built by
``tools/train.py``'s own ``build_cfg`` with synthetic data (128x128 by default) through the config's
pipeline, compared in the ranks."""
import hashlib
import tempfile
from typing import Any, Dict, List, Sequence

import torch
import torch.distributed as dist

from mmddp_hooks.checkpoint import safe_checkpoint_loading

ITERS = 4


def _param_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _train(config: str, options: List[str], size: Sequence[int]) -> Dict[str, Any]:
    from mmengine.runner import Runner
    from train import build_cfg, parse_args

    argv = [config, '--synthetic', *map(str, size), '--iters', str(ITERS), '--launcher', 'pytorch',
            '--work-dir', tempfile.mkdtemp(prefix='mmddp_mmdet_')]
    cfg = build_cfg(parse_args(argv + (['--cfg-options', *options] if options else [])))
    try:
        with safe_checkpoint_loading():
            runner = Runner.from_cfg(cfg)
            runner.train()
    except RuntimeError as e:
        return dict(error=str(e))
    model = runner.model
    # parameters only: BN running statistics are each rank's own after the last forward
    return dict(error=None, digest=_param_digest(model.module),
                params={k: v.detach().clone() for k, v in model.module.state_dict().items()},
                switch_log=list(getattr(model, 'switch_log', [])),
                find_unused=model.find_unused_parameters)


def plain_then_hook(config: str, size: Sequence[int] = (128, 128)) -> Dict[str, Any]:
    """Every rank: the runs, then what the test compares (no parameter tensors leave the rank)."""
    plain = _train(config, ['custom_hooks=[]'], size)
    reference = plain
    if plain['error']:
        reference = _train(config, ['custom_hooks=[]',
                                    'model_wrapper_cfg.find_unused_parameters=True'], size)
    hooked = _train(config, [], size)
    same = (reference['error'] is None and hooked['error'] is None and
            all(torch.equal(reference['params'][k], hooked['params'][k])
                for k in reference['params']))
    return dict(rank=dist.get_rank(), plain_error=plain['error'],
                reference_error=reference['error'], hooked_error=hooked['error'],
                bit_equal=same, digest=hooked.get('digest'), switch_log=hooked.get('switch_log'),
                find_unused=hooked.get('find_unused'))
