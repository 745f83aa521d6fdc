"""Build a config's model on CPU, as training would see it, without data or a process group."""
from typing import Optional

from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from torch import nn


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """``Config.fromfile`` (which runs ``custom_imports``) plus ``--cfg-options`` overrides."""
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def train_only(cfg: Config, max_iters: Optional[int] = None) -> None:
    """Switch validation and testing off; with ``max_iters``, train that many iterations.

    For dry runs (synthetic data, the DDP doctor): an iteration-based loop, logged every iteration.
    """
    for key in ('val_dataloader', 'val_evaluator', 'val_cfg', 'test_dataloader', 'test_evaluator',
                'test_cfg'):
        cfg[key] = None
    if max_iters is None:
        return
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)
    cfg.log_processor = dict(by_epoch=False)
    hooks = cfg.get('default_hooks') or {}
    if hooks.get('logger') is not None:
        hooks['logger'].update(interval=1, log_metric_by_epoch=False)
    if hooks.get('checkpoint') is not None:
        hooks['checkpoint'].update(by_epoch=False, interval=max(1, max_iters // 2))


def build_model(cfg: Config) -> nn.Module:
    """The model in train mode: backbones such as mmseg's ResNet freeze stages in ``train()``."""
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    if 'model' not in cfg:
        raise KeyError('the config has no `model` key')
    model = MODELS.build(cfg.model)
    model.train()
    return model
