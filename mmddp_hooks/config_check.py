"""Static DDP checks of a config (and, with ``build=True``, of the model it builds on CPU).

Shared by ``tools/check_config.py`` and :func:`mmddp_hooks.testing.assert_ddp_config_ok`.
"""
from typing import Any, Dict, List, Optional

from .branches import CONFIG_KEY, BranchDeclarationError, parse_branches, resolve_branches, standard_settings
from .model_from_config import build_model, load_config


def check_config(path: str, cfg_options: Optional[dict] = None,
                 build: bool = False) -> Dict[str, Any]:
    """``{'errors': [...], 'warnings': [...], 'settings': {...}, 'branches': [...]}``.

    ``settings`` are the DDP settings MMEngine will apply (:func:`standard_settings`); every
    top-level key it will ignore is a warning that names the key that decides instead.
    """
    errors: List[str] = []
    warnings: List[str] = []
    try:
        cfg = load_config(path, cfg_options)
    except Exception as e:  # a config that does not load is the first error to name
        return dict(config=path, errors=[f'cannot load the config: {type(e).__name__}: {e}'],
                    warnings=[], settings={}, branches=[])
    settings = standard_settings(cfg)  # what MMEngine will apply, not what the config seems to say
    warnings.extend(settings['dropped'])
    hooks = [h.get('type') for h in cfg.get('custom_hooks', []) or []]
    if settings['find_unused_parameters'] and 'DDPAutoTuneHook' not in hooks:
        warnings.append(f"find_unused_parameters=True ({settings['find_unused_parameters_from']}) "
                        "costs every step; add dict(type='DDPAutoTuneHook') to custom_hooks to keep "
                        'it only if needed')
    _check_registered(cfg, errors)
    branches = []
    try:
        branches = parse_branches(cfg.get(CONFIG_KEY), cfg)
        if build:
            model = build_model(cfg)
            resolve_branches(branches, model)
    except BranchDeclarationError as e:
        errors.append(str(e))
    except Exception as e:
        errors.append(f'cannot build the model: {type(e).__name__}: {e}')
    return dict(config=path, errors=errors, warnings=warnings, settings=settings,
                branches=[dict(name=b.name, flag=b.flag, enabled=b.enabled,
                               n_params=len(b.resolved) if build else None) for b in branches])


def _check_registered(cfg, errors: List[str]) -> None:
    """Hook and wrapper types must resolve in the registries the runner will use."""
    from mmengine.registry import HOOKS, MODEL_WRAPPERS, DefaultScope

    scope = cfg.get('default_scope', 'mmengine')
    with DefaultScope.overwrite_default_scope(scope):
        for i, h in enumerate(cfg.get('custom_hooks', []) or []):
            if isinstance(h, dict) and isinstance(h.get('type'), str) and \
                    HOOKS.get(h['type']) is None:
                errors.append(f"custom_hooks[{i}].type: '{h['type']}' is not a registered hook "
                              "(missing custom_imports = dict(imports=['mmddp_hooks'])?)")
        wrapper = cfg.get('model_wrapper_cfg') or {}
        if isinstance(wrapper.get('type'), str) and MODEL_WRAPPERS.get(wrapper['type']) is None:
            errors.append(f"model_wrapper_cfg.type: '{wrapper['type']}' is not a registered "
                          'model wrapper')
