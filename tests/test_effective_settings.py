"""Every tool reads the DDP settings MMEngine will apply, and ``tools/train.py --iters`` on real data.

MMEngine's ``Runner.wrap_model`` builds DDP from ``model_wrapper_cfg`` alone when it is given, so a
top-level ``find_unused_parameters`` beside it never reaches DDP.
"""
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.evaluator import BaseMetric
from torch.utils.data import DataLoader

from mmddp_hooks.branches import standard_settings
from mmddp_hooks.config_check import check_config

ROOT = Path(__file__).parents[1]


def test_top_level_key_beside_a_wrapper_cfg_without_it_is_ignored():
    s = standard_settings(Config(dict(find_unused_parameters=True,
                                      model_wrapper_cfg=dict(type='MMDistributedDataParallel'))))
    assert s['find_unused_parameters'] is False
    assert s['model_wrapper_cfg'] == dict(type='MMDistributedDataParallel')
    [note] = s['dropped']
    assert note.startswith('top-level find_unused_parameters=True is ignored: model_wrapper_cfg is '
                           'given')
    assert "model_wrapper_cfg.find_unused_parameters=False (not set: DDP's default)" in note
    assert note.endswith('Move the setting into model_wrapper_cfg.')


def test_top_level_key_without_a_wrapper_cfg_is_what_mmengine_passes():
    s = standard_settings(Config(dict(find_unused_parameters=True, sync_bn='torch',
                                      launcher='pytorch')))
    assert s['find_unused_parameters'] is True and s['dropped'] == []
    assert s['find_unused_parameters_from'] == 'top-level find_unused_parameters'
    assert (s['model_wrapper_cfg'], s['static_graph']) == (None, False)
    assert (s['sync_bn'], s['launcher']) == ('torch', 'pytorch')


def test_nothing_set_is_ddp_default():
    s = standard_settings(Config(dict()))
    assert (s['find_unused_parameters'], s['static_graph'], s['dropped']) == (False, False, [])
    assert s['launcher'] == 'none'


@pytest.mark.parametrize('top', [{}, dict(find_unused_parameters=False)])
def test_wrapper_cfg_decides(top):
    s = standard_settings(Config(dict(
        top, model_wrapper_cfg=dict(type='ReconfigurableDDP', find_unused_parameters=True,
                                    static_graph=True))))
    assert s['find_unused_parameters'] is True and s['static_graph'] is True
    if top:
        [note] = s['dropped']
        assert 'top-level find_unused_parameters=False is ignored' in note
        assert note.endswith('Delete the top-level key: model_wrapper_cfg.find_unused_parameters '
                             'decides.')
    else:
        assert s['dropped'] == []


def test_an_empty_wrapper_cfg_is_given_and_top_level_static_graph_is_never_read():
    s = standard_settings(Config(dict(find_unused_parameters=True, static_graph=True,
                                      model_wrapper_cfg=dict())))
    assert (s['find_unused_parameters'], s['static_graph'], s['model_wrapper_cfg']) == (False, False, {})
    assert len(s['dropped']) == 2
    assert s['dropped'][1].startswith('top-level static_graph=True is ignored: MMEngine never reads it')
    assert 'model_wrapper_cfg.static_graph=False' in s['dropped'][1]


def _write(tmp_path, body):
    path = tmp_path / 'cfg.py'
    path.write_text("model = dict(type='NotBuilt')\n" + body)
    return str(path)


def test_check_config_warns_with_both_keys_and_judges_the_effective_value(tmp_path):
    path = _write(tmp_path, "find_unused_parameters = True\n"
                            "model_wrapper_cfg = dict(type='MMDistributedDataParallel')\n")
    result = check_config(path, build=False)
    assert result['errors'] == [] and result['settings']['find_unused_parameters'] is False
    [warning] = result['warnings']  # no 'costs every step': DDP runs with False
    assert 'top-level find_unused_parameters=True is ignored' in warning
    assert 'model_wrapper_cfg.find_unused_parameters=False' in warning

    result = check_config(_write(tmp_path, 'find_unused_parameters = True\n'), build=False)
    assert result['warnings'] == [
        'find_unused_parameters=True (top-level find_unused_parameters) costs every step; add '
        "dict(type='DDPAutoTuneHook') to custom_hooks to keep it only if needed"]


def test_check_config_cli_prints_the_dropped_key(tmp_path, capsys):
    import check_config as tool

    path = _write(tmp_path, "find_unused_parameters = True\n"
                            "model_wrapper_cfg = dict(type='MMDistributedDataParallel')\n")
    assert tool.main([path]) == 0
    out = capsys.readouterr().out
    assert 'warning: top-level find_unused_parameters=True is ignored' in out
    assert '0 errors, 1 warnings' in out


def test_doctor_prints_the_effective_settings_and_dropped_keys(monkeypatch, capsys):
    import ddp_doctor

    from mmddp_hooks import doctor

    settings = standard_settings(Config(dict(find_unused_parameters=True,
                                             model_wrapper_cfg=dict(type='ReconfigurableDDP'))))
    findings = dict(status=doctor.CRASHES, table='<table>', settings=settings,
                    dropped=settings['dropped'], crashes_without_hook=True, auto_summary='<plan>',
                    crash_reason='find_unused_parameters=False with unused parameters',
                    auto=dict(reasons=[]), config_lines='<lines>', teardown_fault=None,
                    data='<data>', dropped_weights=[], cpu_notes=[], upstream_bugs=[])
    monkeypatch.setattr(doctor, 'run_doctor', lambda *a, **k: findings)
    monkeypatch.setattr(doctor, 'preflight', lambda *a: None)  # no such config to load here
    assert ddp_doctor.main(['some_config.py']) == doctor.CRASHES
    out = capsys.readouterr().out
    assert ("config as written runs DDP with find_unused_parameters=False (model_wrapper_cfg, not "
            "set: DDP's default; top-level find_unused_parameters=True is ignored): CRASHES under "
            'DDP: find_unused_parameters=False with unused parameters') in out
    assert f"warning: {settings['dropped'][0]}\n" in out


def test_iters_on_an_iteration_loop_changes_max_iters_only():
    from train import limit_iters

    cfg = Config(dict(train_cfg=dict(type='IterBasedTrainLoop', max_iters=160000, val_interval=16000),
                      val_cfg=dict(type='ValLoop')))
    limit_iters(cfg, 5)
    assert cfg.train_cfg == dict(type='IterBasedTrainLoop', max_iters=5, val_interval=16000)
    assert cfg.val_cfg == dict(type='ValLoop')


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def forward(self, inputs, mode='tensor'):
        return self.lin(inputs)


class _Metric(BaseMetric):
    """Enough of a metric for the runner to build a ``ValLoop`` (never run here)."""

    def process(self, data_batch, data_samples):
        pass

    def compute_metrics(self, results):
        return {}


def test_iters_on_an_epoch_loop_validates_once_at_the_end(tmp_path):
    from mmengine.runner import IterBasedTrainLoop, Runner, ValLoop
    from train import limit_iters

    cfg = Config(dict(
        train_cfg=dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=1),
        val_cfg=dict(type='ValLoop'), test_cfg=dict(type='TestLoop'),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', by_epoch=True, interval=1))))
    limit_iters(cfg, 5)
    assert cfg.train_cfg == dict(type='IterBasedTrainLoop', max_iters=5, val_interval=5)
    assert (cfg.val_cfg, cfg.test_cfg) == (dict(type='ValLoop'), dict(type='TestLoop'))
    assert cfg.default_hooks.checkpoint.by_epoch is False and cfg.log_processor.by_epoch is False

    data = DataLoader([torch.zeros(2)] * 4, batch_size=2)
    runner = Runner(model=_Toy(), work_dir=str(tmp_path), train_dataloader=data,
                    train_cfg=cfg.train_cfg, optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
                    val_dataloader=data, val_cfg=cfg.val_cfg, val_evaluator=[_Metric()],
                    default_hooks=cfg.default_hooks, log_processor=cfg.log_processor)
    loop = runner.train_loop
    assert isinstance(loop, IterBasedTrainLoop)
    assert (loop.max_iters, loop.val_interval, loop.val_begin) == (5, 5, 1)
    assert isinstance(runner.val_loop, ValLoop)


def test_train_py_applies_iters_without_synthetic(tmp_path, monkeypatch):
    import train

    monkeypatch.delenv('RANK', raising=False)
    path = tmp_path / 'cfg.py'
    path.write_text("train_cfg = dict(type='IterBasedTrainLoop', max_iters=80000, val_interval=8000)\n"
                    "find_unused_parameters = True\n")
    cfg = train.build_cfg(train.parse_args([str(path), '--iters', '3', '--work-dir', str(tmp_path)]))
    assert cfg.train_cfg.max_iters == 3 and cfg.launcher == 'none'
    assert standard_settings(cfg)['find_unused_parameters'] is True


def test_train_py_moves_the_top_level_key_into_its_wrapper_cfg(tmp_path):
    import train

    path = tmp_path / 'cfg.py'
    path.write_text('find_unused_parameters = True\n')
    cfg = train.build_cfg(train.parse_args([str(path), '--launcher', 'pytorch',
                                            '--work-dir', str(tmp_path)]))
    assert cfg.model_wrapper_cfg == dict(type='ReconfigurableDDP', find_unused_parameters=True)
    settings = standard_settings(cfg)  # what the hook writes into its report
    assert settings['find_unused_parameters'] is True and settings['dropped'] == []
