"""Config-declared branches: declaration errors, freezing switched-off branches, unreached ones."""
import json
from pathlib import Path

import pytest
from torch import nn

from mmddp_hooks.branches import BranchDeclarationError, parse_branches, resolve_branches
from mmddp_hooks.ranks import run_distributed, run_on_ranks

import branch_cases

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / 'configs' / 'examples' / 'rapsam_like'
CFG = dict(model=dict(use_sam=True, head=dict(use_fusion=False, channels=3)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.sam_distill = nn.Linear(2, 2)
        self.head = nn.Module()
        self.head.fusion_weights = nn.ParameterList(nn.Parameter(nn.init.ones_(
            nn.Parameter(nn.Linear(1, 1).weight.data))) for _ in range(2))


def test_flags_are_read_and_patterns_resolved():
    branches = resolve_branches(parse_branches(dict(
        sam=dict(flag='model.use_sam', modules=['sam_*']),
        fusion=dict(flag='model.head.use_fusion', params=['head.fusion_weights.*'])), CFG), Net())
    assert [(b.name, b.enabled, b.resolved) for b in branches] == [
        ('sam', True, ['sam_distill.weight', 'sam_distill.bias']),
        ('fusion', False, ['head.fusion_weights.0', 'head.fusion_weights.1'])]


@pytest.mark.parametrize('decl, match', [
    (dict(sam=dict(flag='model.use_sam_distill', modules=['sam_distill'])),
     r"ddp_branches.sam.flag: 'model.use_sam_distill' does not exist in the config "
     r'\(model has: head, use_sam\)'),
    (dict(sam=dict(flag='model.head.channels', modules=['sam_distill'])), 'not a boolean switch'),
    (dict(sam=dict(flag='model.use_sam')), 'names no modules and no params'),
    (dict(sam=dict(flag='model.use_sam', module=['x'])), r"unknown keys \['module'\]"),
    (dict(sam='model.use_sam'), 'needs dict'),
])
def test_bad_declarations_name_the_key(decl, match):
    with pytest.raises(BranchDeclarationError, match=match):
        parse_branches(decl, CFG)


@pytest.mark.parametrize('decl, match', [
    (dict(sam=dict(flag='model.use_sam', modules=['sam_distil'])),
     r"ddp_branches.sam.modules: 'sam_distil' matches no module of Net \(top-level modules: "
     r'sam_distill, head\)'),
    (dict(sam=dict(flag='model.use_sam', params=['head.weights.*'])), 'matches no parameter'),
    (dict(a=dict(flag='model.use_sam', modules=['head']),
          b=dict(flag='model.use_sam', params=['head.fusion_weights.0'])),
     "ddp_branches.b overlaps ddp_branches.a: both own 'head.fusion_weights.0'"),
])
def test_bad_patterns_name_the_key(decl, match):
    with pytest.raises(BranchDeclarationError, match=match):
        resolve_branches(parse_branches(decl, CFG), Net())


def test_check_config_cli_exit_codes_and_json(tmp_path, capsys):
    import check_config

    ok = EXAMPLES / 'fusion1_resdistill1_samdistill1.py'
    assert check_config.main([str(ok), '--build']) == 0
    bad = tmp_path / 'bad.py'
    bad.write_text(f"_base_ = [{str(EXAMPLES / '_base_.py')!r}]\n"
                   "ddp_branches = dict(sam_distill=dict(modules=['sam_distil']))\n")
    capsys.readouterr()
    assert check_config.main([str(bad), '--build', '--json']) == 1
    out = json.loads(capsys.readouterr().out)
    assert out['errors'] == ["ddp_branches.sam_distill.modules: 'sam_distil' matches no module of "
                             'RapSAMLikeSegmentor (top-level modules: data_preprocessor, stem, '
                             'levels, decode_head, resolution_distill, sam_distill, point_encoder)']
    assert check_config.main([str(ok), '--cfg-options', 'model_wrapper_cfg.find_unused_parameters=True',
                              'custom_hooks=[]']) == 0
    assert 'costs every step' in capsys.readouterr().out
    assert check_config.main([str(tmp_path / 'missing.py')]) == 1


COMBOS = sorted(str(p) for p in EXAMPLES.glob('fusion*.py'))


def _expected_frozen(name):
    frozen = ['point_encoder.bias', 'point_encoder.weight']
    if 'fusion0' in name:
        frozen += [f'decode_head.fusion_weights.{i}' for i in range(3)]
    if 'resdistill0' in name:
        frozen += ['resolution_distill.0.bias', 'resolution_distill.0.weight',
                   'resolution_distill.2.bias', 'resolution_distill.2.weight']
    if 'samdistill0' in name:
        frozen += ['sam_distill.bias', 'sam_distill.weight']
    return sorted(frozen)


@pytest.mark.dist
@pytest.mark.parametrize('world_size', [2, 3])
def test_every_toggle_combination_trains_without_find_unused(world_size):
    assert len(COMBOS) == 8
    ranks = run_distributed(branch_cases.train_configs, world_size, args=(COMBOS,), timeout=300)
    for runs in zip(*ranks):
        assert len({r['digest'] for r in runs}) == 1, f'{runs[0]["config"]}: replicas diverged'
        for r in runs:
            assert r['plan']['find_unused_parameters'] is False, r
            assert not r['plan']['ignore'] and not r['plan']['fill'], r
            assert r['frozen'] == _expected_frozen(r['config'])


@pytest.mark.dist
def test_enabled_but_unreached_branch_is_reported_and_strict_raises():
    bug = str(EXAMPLES / 'point-prompt-bug.py')
    (r0, *_), *_ = run_distributed(branch_cases.train_configs, 2, args=([bug],), timeout=120)
    assert ('branch point_prompt is enabled by model.use_point_prompt=True but never reached the '
            'loss in 2 iterations on 2 ranks (2 params, e.g. point_encoder.weight)') in \
        r0['plan']['reasons']
    assert r0['plan']['ignore'] == ['point_encoder.weight', 'point_encoder.bias']
    strict = run_on_ranks(branch_cases.train_configs, 2, args=([bug],),
                          kwargs=dict(cfg_options={'custom_hooks.0.strict': True}), timeout=120)
    assert not strict.ok
    assert all('strict: branch point_prompt is enabled' in r.error for r in strict.ranks)

