"""This repository's own configs, checked with the helper a user project would use."""
import pytest

from mmddp_hooks.testing import assert_ddp_config_ok, find_configs


def _marked(config):
    """mmseg, mmdet and mmpretrain configs need those packages (and mmcv): marked, so a side venv
    skips them."""
    for package in ('mmseg', 'mmdet', 'mmpretrain'):
        if f'/{package}/' in str(config):
            return pytest.param(config, marks=getattr(pytest.mark, package))
    return config


@pytest.mark.parametrize('config', [_marked(c) for c in find_configs('configs')], ids=str)
def test_config(config):
    assert_ddp_config_ok(config)
