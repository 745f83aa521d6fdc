"""This repository's own configs, checked with the helper a user project would use."""
import pytest

from mmddp_hooks.testing import assert_ddp_config_ok, find_configs


@pytest.mark.parametrize('config', [
    pytest.param(c, marks=pytest.mark.mmseg) if 'mmseg' in str(c) else c  # mmseg needs mmcv
    for c in find_configs('configs')], ids=str)
def test_config(config):
    assert_ddp_config_ok(config)
