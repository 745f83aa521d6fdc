"""This repository's own configs, checked with the helper a user project would use."""
import pytest

from mmddp_hooks.testing import assert_ddp_config_ok, find_configs


def _marked(config):
    """A config that needs a codebase, mmcv or new-style config support (``read_base``, with the
    ``_base_.py`` beside it) is marked so: where that is missing it is skipped, saying why."""
    text = config.read_text()
    if 'read_base' in text and (config.parent / '_base_.py').exists():
        text += (config.parent / '_base_.py').read_text()
    needs = [package for package in ('mmseg', 'mmdet', 'mmpretrain') if f'/{package}/' in str(config)]
    needs += ['new-style configs'] * ('read_base' in text) + ['mmcv'] * ('mmcv' in text and not needs)
    return pytest.param(config, marks=pytest.mark.needs(*needs)) if needs else config


@pytest.mark.parametrize('config', [_marked(c) for c in find_configs('configs')], ids=str)
def test_config(config):
    assert_ddp_config_ok(config)
