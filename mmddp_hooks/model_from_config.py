"""Build a config's model on CPU, as training would see it, without data or a process group."""
import hashlib
import importlib
import inspect
import os
import tempfile
from typing import Any, Callable, Iterator, List, Optional, Tuple

from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from torch import nn


def config_dicts(node: Any) -> Iterator[dict]:
    """Every dict in a config tree, depth first."""
    if isinstance(node, dict):
        yield node
        node = list(node.values())
    if isinstance(node, (list, tuple)):
        for item in node:
            yield from config_dicts(item)


def type_name(cfg: Any) -> Optional[str]:
    """A config dict's ``type`` as a name without its scope: ``mmdet.DetDataPreprocessor`` is a
    detector's too, and a new-style (lazy) config's class ``LoadImageFromFile`` is named so."""
    kind = cfg.get('type') if isinstance(cfg, dict) else None
    if isinstance(kind, type) or callable(kind):
        return getattr(kind, '__name__', None)
    return kind.rsplit('.', 1)[-1] if isinstance(kind, str) else None


def innermost_datasets(dataset: dict, where: str) -> Iterator[Tuple[dict, str]]:
    """The datasets that read files, under the wrappers (``dataset``/``datasets`` keys)."""
    if isinstance(dataset.get('dataset'), dict):
        yield from innermost_datasets(dataset['dataset'], f'{where}.dataset')
    elif isinstance(dataset.get('datasets'), (list, tuple)):
        for i, inner in enumerate(dataset['datasets']):
            yield from innermost_datasets(inner, f'{where}.datasets[{i}]')
    else:
        yield dataset, where


def take_subset(cfg: Config, subset: int) -> str:
    """Train on the first ``subset`` samples of each innermost dataset (MMEngine's ``indices``);
    what was done, said."""
    loader = cfg.get('train_dataloader') or {}
    if not isinstance(loader.get('dataset'), dict):
        raise ValueError('--subset: the config has no train_dataloader.dataset')
    done = []
    for dataset, where in innermost_datasets(loader['dataset'], 'train_dataloader.dataset'):
        dataset['indices'] = subset
        done.append(f'{where} ({type_name(dataset)})')
    return f"the first {subset} samples of {', '.join(done)}"


def config_path(path: str) -> str:
    """``mmseg::fcn/x.py`` (as ``_base_`` names it) -> that config in the installed package."""
    if '::' not in path:
        return path
    package, rel = path.split('::', 1)
    module = importlib.import_module(package)
    return os.path.join(os.path.dirname(module.__file__), '.mim', 'configs', rel)


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """``Config.fromfile`` (which runs ``custom_imports``) plus ``--cfg-options`` overrides."""
    cfg = Config.fromfile(config_path(path))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def unformatted(cfg: Config) -> Config:
    """``cfg``, to be logged and dumped without yapf (MMEngine's ``format_python_code=False``;
    before 0.8 there is no such switch). MMEngine formats the config each time it logs or dumps it,
    at every checkpoint too: 5 s a time for DETR, 59 s of a 4-iteration run's 86 s here, and 0.1 s
    of a toy model's 1.5 s run."""
    if '_format_python_code' in vars(cfg):
        object.__setattr__(cfg, '_format_python_code', False)
    return cfg


def train_only(cfg: Config, max_iters: Optional[int] = None) -> None:
    """Switch validation and testing off; with ``max_iters``, train that many iterations.

    For dry runs (synthetic data, the DDP doctor): an iteration-based loop, logged every iteration,
    without the config's ``param_scheduler``; the config is logged and dumped unformatted.
    """
    for key in ('val_dataloader', 'val_evaluator', 'val_cfg', 'test_dataloader', 'test_evaluator',
                'test_cfg'):
        cfg[key] = None
    unformatted(cfg)
    if max_iters is None:
        return
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)
    # epoch schedules (mmpretrain's warm-up ``begin=20``) cannot fit in one iteration-based "epoch",
    # and learning rates do not change which parameters get gradients
    cfg.param_scheduler = None
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
    spec = cfg.model
    if cfg.get('data_preprocessor') and 'data_preprocessor' not in spec:
        spec = dict(spec, data_preprocessor=cfg.data_preprocessor)  # as the Runner does
    model = MODELS.build(spec)
    model.train()
    return model


def _remote(path: Any) -> bool:
    """A checkpoint this machine lacks: a missing file, or a URL (``https://``, ``open-mmlab://``,
    ...) that is not in torch.hub's cache, where MMEngine keeps its downloads."""
    if not isinstance(path, str):
        return False
    if '://' not in path:
        return not os.path.exists(path)
    import torch

    cached = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(path))
    return not (path.startswith(('http://', 'https://')) and os.path.exists(cached))


def _nested_path(path: str, scope: Optional[str]) -> str:
    """A config file a model names (mmpose's distillers' ``teacher_cfg='configs/...'``, relative
    to the codebase's repository): as given where it exists, else the installed package's copy."""
    if os.path.exists(path) or not scope:
        return path
    try:
        shipped = config_path(f'{scope}::{path.split("configs/", 1)[-1]}')
    except ImportError:
        return path
    return shipped if os.path.exists(shipped) else path


def rewrite_nested_configs(cfg: Config, rewrite: Callable[[Config], Any]) -> None:
    """Apply ``rewrite`` to the config files the model builds parts from (a ``*_cfg`` key naming a
    ``.py`` file: mmpose's ``DWPoseDistiller`` reads its teacher and student so), in place: each is
    loaded, rewritten, written to the temporary folder under a name of its content, and named
    instead."""
    scope = cfg.get('default_scope')
    for d in config_dicts(cfg.get('model')):
        for key, value in list(d.items()):
            if not (key.endswith('_cfg') and isinstance(value, str) and value.endswith('.py')):
                continue
            nested = Config.fromfile(_nested_path(value, scope))
            rewrite(nested)
            text = unformatted(nested).pretty_text
            folder = os.path.join(tempfile.gettempdir(), 'mmddp_nested_configs')
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, hashlib.sha1(text.encode()).hexdigest()[:16] + '.py')
            if not os.path.exists(path):
                tmp = f'{path}.{os.getpid()}'
                with open(tmp, 'w') as f:
                    f.write(text)
                os.replace(tmp, path)  # ranks write the same text: whichever lands is whole
            d[key] = path


def _takes(spec: dict, arg: str, scope: Optional[str]) -> bool:
    """Whether the registered class a model config dict builds takes ``arg``."""
    if not isinstance(spec.get('type'), str):
        return False
    try:
        with MODELS.switch_scope_and_registry(scope) as registry:
            cls = registry.get(spec['type'])
        return arg in inspect.signature(cls).parameters
    except Exception:  # unregistered, unimportable or without a signature: left as it is
        return False


def drop_remote_weights(cfg: Config) -> List[str]:
    """Drop, in place, the model's pretrained weights that are not on this machine; what was dropped.

    For dry runs offline (the DDP doctor): an ``init_cfg`` of type ``Pretrained`` and a ``pretrained``
    key (or ``*_pretrained``: a distiller's teacher) that name a URL or a missing file, also in the
    config files the model builds parts from. Which parameters receive gradients does not depend
    on their starting values; local files stay (``--trust-checkpoint`` decides how they load).
    """
    dropped: List[str] = []
    rewrite_nested_configs(cfg, lambda nested: dropped.extend(drop_remote_weights(nested)))
    for d in config_dicts(cfg.get('model')):
        for key in [k for k in d if k == 'pretrained' or str(k).endswith('_pretrained')]:
            if _remote(d[key]):
                dropped.append(d[key])
                d[key] = None
                if key == 'pretrained' and _takes(d, 'pretrained2d', cfg.get('default_scope')):
                    # mmaction2's TSM and others convert `pretrained` from 2D (default True) and
                    # load it without asking whether there is one: nothing to convert now
                    d['pretrained2d'] = False
        inits = d.get('init_cfg')
        many = inits if isinstance(inits, (list, tuple)) else [inits]
        kept = [i for i in many if not (isinstance(i, dict) and i.get('type') == 'Pretrained'
                                        and _remote(i.get('checkpoint')))]
        if len(kept) < len(many):
            dropped += [i['checkpoint'] for i in many if i not in kept]
            d['init_cfg'] = (kept or None) if isinstance(inits, (list, tuple)) else None
    return dropped


def amp_off_on_cpu(cfg: Config) -> Optional[str]:
    """``AmpOptimWrapper`` -> ``OptimWrapper`` where there is no GPU (MMEngine's AMP wrapper refuses
    to build on CPU); what was changed, or None. Autocast changes no parameter's usage."""
    import torch

    wrapper = cfg.get('optim_wrapper') or {}
    if torch.cuda.is_available() or wrapper.get('type') not in ('AmpOptimWrapper',
                                                                'mmengine.AmpOptimWrapper'):
        return None
    for key in ('loss_scale', 'dtype', 'use_fsdp'):
        wrapper.pop(key, None)
    wrapper['type'] = 'OptimWrapper'
    return "optim_wrapper AmpOptimWrapper runs as OptimWrapper (no GPU here; MMEngine's AMP wrapper " \
           'needs one)'
