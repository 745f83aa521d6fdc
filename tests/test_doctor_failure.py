"""The doctor's first failure names its real cause, in one process: the missing module behind
MMEngine's own ImportError, the stage the failure happened in (not how far the doctor's bookkeeping
got), advice that applies, and for a type not in the registry, the class in the repository around
the config with the import that registers it. Each failure is raised by MMEngine's own Runner or
registry, as on a rank, and classified as a rank does."""
import itertools

import pytest
import research_cases
from mmengine.config import Config
from mmengine.registry import MODELS

from mmddp_hooks.doctor_failure import DATA, MODEL, VISUALIZER, classify, paragraph
from mmddp_hooks.synthetic import use_batch_builder

CONFIG = '''
from mmengine.optim import OptimWrapper
from torch.optim import SGD
from research_cases import {model}

model = dict(type={model})
train_dataloader = dict(batch_size=2, dataset=dict())
train_cfg = dict(by_epoch=False, max_iters=2)
optim_wrapper = dict(type=OptimWrapper, optimizer=dict(type=SGD, lr=0.01))
{extra}
'''
_RUNS = itertools.count()  # a Runner's visualizer is a named singleton: each build names its own


def _runner_error(tmp_path, model: str, extra: str = '', train: bool = False, options=None):
    """The config built by MMEngine's Runner in this process (and trained, with ``train``): its
    config file, the config and the exception raised, or None."""
    from mmengine.runner import Runner

    path = tmp_path / 'config.py'
    path.write_text(CONFIG.format(model=model, extra=extra))
    cfg = Config.fromfile(str(path))
    cfg.merge_from_dict(options or {})
    use_batch_builder(cfg, 'research_cases.tiny_batch', 2)
    cfg.update(work_dir=str(tmp_path / 'work'), log_level='WARNING',
               experiment_name=f'doctor_failure_{next(_RUNS)}')
    try:
        runner = Runner.from_cfg(cfg)
        if train:
            runner.train()
    except Exception as err:
        return str(path), cfg, err
    return str(path), cfg, None


def test_a_missing_module_behind_mmengines_import_error_is_named_with_its_stage(tmp_path):
    backend = research_cases.missing_module_backend()
    module = 'tensorboard' if backend == 'TensorboardVisBackend' else 'no_such_tensorboard'
    extra = f"visualizer = dict(type='Visualizer', vis_backends=[dict(type='{backend}')])"
    path, cfg, err = _runner_error(tmp_path, '_Tiny', extra)
    assert isinstance(err, ImportError) and not getattr(err, 'name', None)  # MMEngine's wrapper
    # the doctor's bookkeeping says "building the model" (Runner.from_cfg); the frames say where
    found = classify(err, MODEL, path, cfg, real_data=False, rank=0)
    assert found['stage'] == VISUALIZER and found['kind'] == 'missing module'
    assert found['cause'].startswith(f"the module '{module}' is not installed")
    assert 'the config key visualizer.vis_backends[0] builds ' + backend in found['cause']
    assert found['todo'] == (f'Install it (pip install {module}), or leave {backend} out of the '
                             'dry run (--cfg-options visualizer.vis_backends=[]; it changes no '
                             "parameter's gradient).")
    assert 'a module' not in paragraph(found) and 'synthetic' not in paragraph(found)
    # the way out it gives works
    assert _runner_error(tmp_path, '_Tiny', extra, options={'visualizer.vis_backends': []})[2] is None


def test_synthetic_data_is_advised_only_for_the_real_data_that_needs_the_module():
    try:
        try:
            import no_such_decoder  # noqa: F401
        except ImportError:
            raise ImportError('install the decoder')  # noqa: B904 - chained as a library does
    except ImportError as e:
        err = e
    on_real = classify(err, DATA, real_data=True)
    assert "the module 'no_such_decoder'" in on_real['cause'] and '--real-data' in on_real['todo']
    assert 'synthetic' not in classify(err, DATA, real_data=False)['todo']


def test_an_error_in_the_models_init_weights_is_building_the_model(tmp_path):
    path, cfg, err = _runner_error(tmp_path, 'InitWeightsFails', train=True)
    assert isinstance(err, ValueError), err
    found = classify(err, DATA, path, cfg)  # the doctor's bookkeeping: runner.train() had begun
    assert found['stage'] == MODEL, found
    assert found['cause'].startswith('ValueError: init_cfg names no layer of this model (at '
                                     'tests/research_cases.py:'), found['cause']
    assert "raise ValueError('init_cfg names no layer of this model')" in found['cause']


def test_a_type_not_in_the_registry_names_its_class_and_the_import_to_add(tmp_path, monkeypatch):
    repo, config = research_cases.research_repo(tmp_path)
    with pytest.raises(KeyError) as raised:
        MODELS.build(Config.fromfile(str(config)).model)
    monkeypatch.chdir(repo)
    found = classify(raised.value, MODEL, str(config), rank=1)
    assert found['kind'] == 'not registered'
    assert found['cause'] == ('AdapterNet is not in the mmengine::model registry: `class AdapterNet` '
                              'is in my_research/models/adapter_net.py:6, which nothing imports (a '
                              'tools/train.py of your own may import it; the config does not)')
    assert found['todo'] == ("Add custom_imports = dict(imports=['my_research.models.adapter_net'], "
                             'allow_failed_imports=False) to the config.')
    # the line it names registers the type
    monkeypatch.syspath_prepend(str(repo))
    config.write_text(config.read_text() + "custom_imports = dict(imports=['my_research.models."
                                           "adapter_net'], allow_failed_imports=False)\n")
    assert type(MODELS.build(Config.fromfile(str(config)).model)).__name__ == 'AdapterNet'
    MODELS._module_dict.pop('AdapterNet')


def test_a_class_outside_the_repository_is_not_looked_for(tmp_path, monkeypatch):
    repo, config = research_cases.research_repo(tmp_path)
    (tmp_path / 'elsewhere.py').write_text('class ElsewhereNet:\n    pass\n')
    config.write_text("model = dict(type='ElsewhereNet')\n")
    with pytest.raises(KeyError) as raised:
        MODELS.build(Config.fromfile(str(config)).model)
    monkeypatch.chdir(tmp_path)
    found = classify(raised.value, MODEL, str(config))
    assert found['cause'] == ('ElsewhereNet is not in the mmengine::model registry and no `class '
                              'ElsewhereNet` is in the repository around '
                              'repo/configs/adapter/adapter_net.py')
    assert "custom_imports = dict(imports=['<package.module>']" in found['todo']
