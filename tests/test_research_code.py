"""The doctor on research code (configs/examples/two_kinds: a new-style config importing a local
package, two batch kinds each training its own branch, with and without zero-weighted keep-alive
terms), checked against one process's usage per batch kind and against plain DDP; and its clean
failures: one paragraph naming the stage and the cause, exit code 2, one JSON object with --json."""
import contextlib
import io
import json

import pytest
import research_cases

from mmddp_hooks.ranks import run_distributed
from mmddp_hooks.report import DYNAMIC, NEVER

# every config here is a new-style one; the two-kinds example's data also imports mmcv's transforms
pytestmark = [pytest.mark.dist, pytest.mark.needs('new-style configs')]
NEEDS_MMCV = pytest.mark.needs('mmcv')
EXAMPLES = research_cases.EXAMPLES


def doctor_json(*args):
    """``tools/ddp_doctor.py ARGS --json`` in this process: exit code, stdout (parsed), stderr."""
    import ddp_doctor

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = ddp_doctor.main([*map(str, args), '--json'])
    return code, json.loads(out.getvalue()), err.getvalue()


def _names(report, kind):
    return {p['name'] for p in report['params'] if p['kind'] == kind}


@pytest.fixture(scope='module')
def truth():
    used = research_cases.usage_per_kind(f'{EXAMPLES}/no_keep_alive.py')
    both = used['det'] | used['sam']
    return dict(never=used['trainable'] - both, dynamic=both - (used['det'] & used['sam']),
                det_only=used['det'] - used['sam'], sam_only=used['sam'] - used['det'])


@NEEDS_MMCV
def test_without_keep_alive_terms_the_doctor_finds_the_usage_per_batch_kind(truth):
    code, found, log = doctor_json(f'{EXAMPLES}/no_keep_alive.py')
    assert code == 1, log[-3000:]  # plain DDP as written crashes: see the training test below
    report = found['report']
    assert truth['never'] == {'caption_adapter.weight', 'caption_adapter.bias'}
    assert _names(report, NEVER) == truth['never']
    assert _names(report, DYNAMIC) == truth['dynamic'] and truth['dynamic']
    explained = {p['name']: p['explained_by'] for p in report['params'] if p['explained_by']}
    assert explained == {**{n: "data_tag='det'" for n in truth['det_only']},
                         **{n: "data_tag='sam'" for n in truth['sam_only']}}
    assert set(report['batch_kinds']['data_tag']) == {'det', 'sam'}
    assert all(n >= 3 for n in report['batch_kinds']['data_tag'].values())  # probed on if not
    assert not report['kept_alive'] and found['auto']['find_unused_parameters'] is True
    assert "only in batches with data_tag='det'" in found['table']
    assert found['batch'].startswith("per-rank batch 2 (lowered from the config's 16")


@NEEDS_MMCV
def test_keep_alive_terms_are_found_with_their_line_and_the_plan_without_them(truth):
    code, found, log = doctor_json(f'{EXAMPLES}/keep_alive.py')
    assert code == 0, log[-3000:]  # the terms keep plain DDP from crashing
    report = found['report']
    assert report['counts'][NEVER] == report['counts'][DYNAMIC] == 0
    assert set(report['kept_alive']) == truth['never'] | truth['dynamic']
    real = report['without_keepalive']
    assert _names(real, NEVER) == truth['never'] and _names(real, DYNAMIC) == truth['dynamic']
    terms = {t for p in report['params'] for t in p['zero_terms']}
    assert len(terms) == 1 and terms.pop().startswith('projects/two_kinds/models.py:')
    kept = {p['name']: p['kept_alive'] for p in report['params']}
    cells = report['n_ranks'] * report['n_iters']
    assert kept['caption_adapter.weight'] == cells  # every rank-iteration
    reason = found['auto']['reasons'][-1]
    assert 'kept alive by zero-weighted terms' in reason and 'SGD' not in reason
    assert 'AdamW (its running averages, weight decay 0.05) moves a parameter' in reason
    assert 'Delete the terms: DDPAutoTuneHook then plans the real usage' in reason
    assert reason.endswith('find_unused_parameters=True, and idle branches get None gradients, '
                           'as under find_unused_parameters=True')


@NEEDS_MMCV
def test_plain_ddp_crashes_as_the_doctor_said_and_the_hook_trains_as_find_unused():
    iters = 100
    rows = run_distributed(research_cases.example_runs, 2, args=(iters,), timeout=300)
    assert rows[0]['digest'] == rows[1]['digest'], 'replicas diverged'
    for r in rows:
        assert 'Expected to have finished reduction' in r['plain_error']  # no_keep_alive: crashes
        assert r['kept_error'] is None and r['reference_error'] is None and r['hooked_error'] is None
        assert r['plan']['find_unused_parameters'] is True
        assert r['explained']['box_head.0.weight'] == "data_tag='det'"  # the hook's report says it
        assert r['explained']['mask_decoder.weight'] == "data_tag='sam'"
        assert r['losses'] == iters and r['loss_diff'] == 0 and r['bit_equal'], r
        # a zero gradient is not None: weight decay moved the never-used adapter in the kept-alive run
        assert r['kept_moved']['caption_adapter.weight'] > 1e-4


CONFIG = '''
from mmengine.optim import OptimWrapper
from torch.optim import SGD
{imports}

model = dict(type={model})
train_dataloader = dict(batch_size=2, dataset=dict())
train_cfg = dict(by_epoch=False, max_iters=4)
optim_wrapper = dict(type=OptimWrapper, optimizer=dict(type=SGD, lr=0.01))
ddp_doctor = dict(synthetic_batch='research_cases.tiny_batch')
'''


def _config(tmp_path, model, imports=None):
    path = tmp_path / f'{model}.py'
    path.write_text(CONFIG.format(model=model, imports=imports or
                                  f'from research_cases import {model}'))
    return path


def test_a_missing_module_names_the_config_line_that_imports_it(tmp_path):
    path = _config(tmp_path, 'Net', 'from no_such_research_pkg.models import Net')
    code, found, _ = doctor_json(path)
    assert code == 2 and found['status'] == 2 and found['stage'] == 'loading the config'
    assert found['failure']['kind'] == 'missing module'
    assert "the module 'no_such_research_pkg' is not installed" in found['error']
    assert f'{path}:4: from no_such_research_pkg.models import Net' in found['error']
    assert 'Traceback' not in json.dumps(found)  # tracebacks are for --debug


@pytest.mark.parametrize('model, stage, words', [
    ('NeedsEmbeddings', 'building the model', [
        'the file data/text_embeddings.npy does not exist (opened by tests/research_cases.py:',
        'np.load(embeddings)', '--cfg-options KEY=PATH']),
    ('HardCodedCuda', 'building the model', [
        "'cuda' was asked for on this CPU-only machine, by tests/research_cases.py:",
        "torch.zeros(4, device='cuda')", "instead of 'cuda'"]),
    ('KilledOnRank1', 'building the model', [
        'on rank 1', 'the rank was killed (signal 9, exit code -9) holding',
        "most likely the kernel's OOM killer", '--batch-size']),
])
def test_failures_in_the_ranks_are_one_paragraph_with_stage_and_cause(tmp_path, model, stage, words):
    code, found, log = doctor_json(_config(tmp_path, model))
    assert code == 2 and found['stage'] == stage, log[-3000:]
    for word in words:
        assert word in found['error'], found['error']
    assert 'details' not in found and 'Traceback' not in found['error']


def test_debug_adds_every_ranks_traceback(tmp_path):
    code, found, _ = doctor_json(_config(tmp_path, 'HardCodedCuda'), '--debug')
    assert code == 2 and 'Traceback' in found['details'] and '--- rank 1' in found['details']


@NEEDS_MMCV
def test_real_data_subset_takes_the_first_samples(tmp_path):
    from projects.two_kinds import write_demo_data

    write_demo_data(str(tmp_path), n=8)
    code, found, log = doctor_json(
        f'{EXAMPLES}/no_keep_alive.py', '--real-data', '--subset', 4, '--iters', 2,
        '--cfg-options', f'train_dataloader.dataset.data_root={tmp_path}',
        'train_dataloader.num_workers=0', 'train_dataloader.persistent_workers=False')
    assert code == 1, log[-3000:]
    assert found['data'] == ("the config's own train data, the first 4 samples of "
                             'train_dataloader.dataset (PromptedImages)')
    assert 'caption_adapter' in found['table']


def test_the_configs_batch_of_one_is_kept(tmp_path):
    path = _config(tmp_path, 'PerSampleChannels')
    path.write_text(path.read_text().replace('batch_size=2', 'batch_size=1'))
    code, found, log = doctor_json(path)
    assert code == 0, log[-3000:]  # at a batch of 2, every rank raises an IndexError
    assert found['batch'] == "per-rank batch 1 (the config's)"
    code, found, log = doctor_json(path, '--batch-size', 2)
    assert code == 2 and 'IndexError: index 0 is out of bounds' in found['error'], found


def test_a_rank_that_raised_is_the_cause_and_the_others_lost_peer_its_consequence(tmp_path):
    code, found, log = doctor_json(_config(tmp_path, 'RaisesOnRank1'))
    assert code == 2, log[-3000:]
    assert found['failure']['rank'] == 1 and found['failure']['consequences'] == [0], found
    assert found['error'].startswith(
        'ddp_doctor stopped while running on rank 1, before a verdict: IndexError: index 2 is out '
        'of bounds for dimension 0 with size 2 (at tests/research_cases.py:'), found['error']
    assert 'inputs = inputs[inputs.shape[0]]' in found['error']
    assert found['error'].endswith(
        'Rank 0 then lost its peer (a consequence of the error above, not a cause).')
    assert 'OOM' not in found['error'] and 'SIGKILL' not in found['error']


def test_ranks_that_fail_differently_each_name_their_first_error(tmp_path):
    """The visualizer stops rank 0 (its backends run there only); rank 1 goes on and stops on a
    model type its repository registers in a package the config does not import."""
    backend = research_cases.missing_module_backend()
    _, config = research_cases.research_repo(tmp_path)
    config.write_text(CONFIG.format(model="'AdapterNet'", imports='import research_cases')
                      + f"visualizer = dict(type='Visualizer', vis_backends=[dict(type='{backend}')])\n")
    code, found, log = doctor_json(config)
    assert code == 2, log[-3000:]
    error, other = found['error'], found['failure']['others']
    assert error.startswith('ddp_doctor stopped while setting up the visualizer and loggers on rank '
                            '0, before a verdict: the module '), error
    assert [(o['ranks'], o['stage'], o['kind']) for o in other] == [
        ([1], 'building the model', 'not registered')]
    assert ('Rank 1 stopped on a different error, while building the model: AdapterNet is not in '
            'the mmengine::model registry: `class AdapterNet` is in ') in error
    assert "Add custom_imports = dict(imports=['my_research.models.adapter_net'], " in error
