"""The late-freeze examples (configs/examples/late_freeze) on ranks: plain MMDistributedDataParallel
built by the Runner as the config would build it, with find_unused_parameters False and True, and
the doctor's own rank function on the same configs, in one pair of processes."""
import tempfile
from typing import Any, Dict, Optional

from mmddp_hooks.model_from_config import load_config

import scenarios

EXAMPLES = 'configs/examples/late_freeze'
CONFIGS = ('freeze_in_train', 'constructor_calls_train', 'hook_freezes')


def plain_run(config: str, find_unused: bool, iters: int) -> Dict[str, Any]:
    """The config through Runner.from_cfg in plain MMDistributedDataParallel (device_ids=None: a
    CPU module), on the config's batch builder: the iterations it trained, or its error."""
    from mmengine.runner import Runner

    from mmddp_hooks.synthetic import use_batch_builder

    cfg = load_config(f'{EXAMPLES}/{config}.py')
    use_batch_builder(cfg, cfg.ddp_doctor.synthetic_batch, iters)
    cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None,
                                 find_unused_parameters=find_unused)
    cfg.default_hooks = dict(logger=dict(type='LoggerHook', interval=50), checkpoint=None)
    cfg.update(work_dir=tempfile.mkdtemp(prefix='mmddp_late_freeze_'), launcher='pytorch',
               env_cfg=dict(dist_cfg=dict(backend='gloo')), log_level='WARNING',
               experiment_name=f'plain_{config}_{find_unused}')
    recorder = scenarios.LossRecorder()
    try:
        runner = Runner.from_cfg(cfg)
        runner.register_hook(recorder)
        runner.train()
    except RuntimeError as e:
        return dict(error=str(e), losses=len(recorder.losses))
    return dict(error=None, losses=len(recorder.losses))


def doctor_verdict(config: str, find_unused: bool, work_dir: str) -> Optional[Dict[str, Any]]:
    """The doctor's rank function on the config, ``find_unused_parameters`` as the config has it
    or set on top (rank 0: the findings)."""
    from mmddp_hooks.doctor import doctor_rank

    options = dict(experiment_name=f'doctor_{config}_{find_unused}')
    if find_unused:
        options['find_unused_parameters'] = True
    return doctor_rank(f'{EXAMPLES}/{config}.py', options, 1, None, True,
                       tempfile.mkdtemp(dir=work_dir))


def runs(iters: int) -> Dict[str, Any]:
    """Every rank: each config under plain DDP with False and True, and the doctor on it."""
    work_dir = tempfile.mkdtemp(prefix='mmddp_late_freeze_doctor_')
    return {(config, find_unused): dict(plain=plain_run(config, find_unused, iters),
                                        doctor=doctor_verdict(config, find_unused, work_dir))
            for config in CONFIGS for find_unused in (False, True)}
