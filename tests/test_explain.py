"""DDP's real unused-parameter error on 2 and 3 gloo ranks, explained by name, offline and in-process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import explain_ddp_error
import pytest

from mmddp_hooks.ranks import run_on_ranks

import explain_models

HERE = os.path.dirname(__file__)
CONFIG = os.path.join(HERE, 'configs', 'explain_net.py')
TOOL = os.path.join(HERE, '..', 'tools', 'explain_ddp_error.py')


def _trigger(tmp_path, world_size, via_wrapper=False, cfg=CONFIG):
    result = run_on_ranks(explain_models.trigger, world_size, args=(cfg, str(tmp_path)),
                          kwargs=dict(via_wrapper=via_wrapper), timeout=120, failure_grace=5)
    assert not result.ok  # DDP raised on every rank
    saved = {r: json.load(open(tmp_path / f'rank{r}.json')) for r in range(world_size)}
    log = tmp_path / 'train.log'
    log.write_text('\n'.join(r.output for r in result.ranks))  # the real stderr of every rank
    return saved, log


def _explain_json(capsys, *argv):
    code = explain_ddp_error.main([*argv, '--json'])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.dist
@pytest.mark.parametrize('world_size', [2, 3])
def test_offline_names_equal_truth_on_every_rank(tmp_path, capsys, world_size):
    saved, log = _trigger(tmp_path, world_size)
    code, out = _explain_json(capsys, CONFIG, str(log))
    assert code == 0
    explained = {r['rank']: [[p['index'], p['name']] for p in r['params']] for r in out['unused']}
    assert explained == {r: saved[r]['truth'] for r in range(world_size)}
    for r in range(world_size):  # the rank's skipped branch, the dead root parameter; never frozen
        names = [n for _, n in saved[r]['truth']]
        assert f'branches.{r}.weight' in names and 'unused_root' in names
        assert not any(n.startswith(('frozen', 'ignored_head')) for n in names)


@pytest.mark.dist
def test_truncated_list_is_said_to_be_cut(tmp_path, capsys):
    cfg = tmp_path / 'many.py'
    cfg.write_text(f"_base_ = [{CONFIG!r}]\nmodel = dict(many_unused=150)\n")
    saved, log = _trigger(tmp_path, 2, cfg=str(cfg))
    assert '...' in saved[0]['text']
    code, out = _explain_json(capsys, str(cfg), str(log))
    assert code == 0
    rank0 = next(r for r in out['unused'] if r['rank'] == 0)
    assert rank0['truncated'] and len(rank0['params']) == 100
    assert [[p['index'], p['name']] for p in rank0['params']] == saved[0]['truth'][:100]
    explain_ddp_error.main([str(cfg), str(log)])
    assert 'DDP cut its list after 100 entries' in capsys.readouterr().out


@pytest.mark.dist
def test_in_process_reraise_keeps_ddp_text_and_adds_names(tmp_path):
    saved, _ = _trigger(tmp_path, 2, via_wrapper=True)
    for s in saved.values():
        assert s['type'] == 'RuntimeError'
        assert 'Expected to have finished reduction in the prior iteration' in s['text']
        assert '[mmddp_hooks] the indices above, by name:' in s['text']
        for index, name in s['truth']:
            assert f'{index:>5} -> {name}' in s['text']
        assert 'DDPAutoTuneHook' in s['text']


def test_cli_exit_codes_and_stdin(tmp_path, capsys):
    # one real process (stdin, and the exit code a shell sees), then main() for the other codes
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE] + sys.path))
    msg = 'Parameter indices which did not receive grad for rank 1: 0 2'
    run = subprocess.run([sys.executable, TOOL, CONFIG, '-'], input=msg, text=True,
                         capture_output=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert '0 -> scale' in run.stdout and '2 -> enc.weight (also dec.weight)' in run.stdout
    capsys.readouterr()
    assert explain_ddp_error.main([CONFIG, 'all good']) == 1
    assert 'no DDP error message recognised' in capsys.readouterr().err
    assert explain_ddp_error.main([str(tmp_path / 'missing.py'), msg]) == 2
    assert 'cannot build the model' in capsys.readouterr().err


def test_declared_branch_owning_an_index_is_named(capsys):
    config = str(Path(HERE).parent / 'configs' / 'examples' / 'rapsam_like' /
                 'fusion1_resdistill0_samdistill1.py')
    # reducer order of RapSAMLikeSegmentor: stem (0, 1), levels (2-7), fusion_weights (8-10), ...
    code, out = _explain_json(capsys, config,
                              'Parameter indices which did not receive grad for rank 0: 8 13')
    assert code == 0
    named = {p['name']: p['branch'] for p in out['unused'][0]['params']}
    assert named == {'decode_head.fusion_weights.0': 'learnable_fusion: '
                                                     'model.decode_head.use_learnable_fusion=True',
                     'resolution_distill.0.weight': 'resolution_distill: '
                                                    'model.use_resolution_distill=False'}
    explain_ddp_error.main([config, 'Parameter indices which did not receive grad for rank 0: 13'])
    assert '(config branch resolution_distill: model.use_resolution_distill=False)' in \
        capsys.readouterr().out


def test_index_past_the_model_is_an_error(capsys):
    code, out = _explain_json(capsys, CONFIG,
                              'Parameter indices which did not receive grad for rank 0: 1 999')
    assert code == 2 and out['unused'][0]['unknown_indices'] == [999]


@pytest.mark.parametrize('text, key', [
    ('RuntimeError: Expected to mark a variable ready only once.', 'marked_ready_twice'),
    ('find_unused_parameters=True was specified in DDP constructor, but did not find any unused '
     'parameters in the forward pass.', 'find_unused_not_needed'),
    ('UserWarning: Grad strides do not match bucket view strides.', 'grad_strides'),
])
def test_other_messages_get_their_fix(capsys, text, key):
    code, out = _explain_json(capsys, CONFIG, text)
    assert code == 0 and [o['message'] for o in out['other']] == [key]


def test_ignored_names_from_flag_shift_indices(capsys):
    msg = 'Parameter indices which did not receive grad for rank 0: 0'
    _, plain = _explain_json(capsys, CONFIG, msg)
    _, ignored = _explain_json(capsys, CONFIG, msg, '--ignore', 'scale')
    assert plain['unused'][0]['params'][0]['name'] == 'scale'
    assert ignored['unused'][0]['params'][0]['name'] == 'unused_root'
