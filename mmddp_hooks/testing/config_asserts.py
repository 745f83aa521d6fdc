"""pytest helpers for a project's own configs: three lines per test file."""
from pathlib import Path
from typing import List, Optional, Union


def assert_ddp_config_ok(path: Union[str, Path], build: bool = True,
                         cfg_options: Optional[dict] = None) -> dict:
    """Fail with every error of :func:`mmddp_hooks.config_check.check_config`; return its result.

    Example::

        @pytest.mark.parametrize('config', find_configs('configs'), ids=str)
        def test_config(config):
            assert_ddp_config_ok(config)
    """
    from ..config_check import check_config

    result = check_config(str(path), cfg_options, build=build)
    if result['errors']:
        raise AssertionError(f'{path}: ' + '; '.join(result['errors']))
    return result


def find_configs(root: Union[str, Path]) -> List[Path]:
    """Every ``*.py`` config under ``root``, skipping ``_base_`` files and folders."""
    return sorted(p for p in Path(root).rglob('*.py')
                  if '_base_' not in p.parts and not p.name.startswith('_'))
