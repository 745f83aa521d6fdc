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


def build_model(cfg: Config) -> nn.Module:
    """The model in train mode: backbones such as mmseg's ResNet freeze stages in ``train()``."""
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    if 'model' not in cfg:
        raise KeyError('the config has no `model` key')
    model = MODELS.build(cfg.model)
    model.train()
    return model
