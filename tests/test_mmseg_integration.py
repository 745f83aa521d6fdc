"""Real mmsegmentation 1.2.2 configs on 2 gloo CPU ranks through tools/train.py and the doctor.

Each run is tools/train.py's main on the suite's ranks (launch.train), under a hard timeout that kills
its process group; the crash through tools/dist_train.sh is a real launch, as is tests/test_launchers.py.
"""
import json

import pytest
import torch

import launch

pytestmark = [pytest.mark.dist, pytest.mark.mmseg]

ROOT = launch.ROOT
FCN_STAGE4 = ROOT / 'configs' / 'mmseg' / 'fcn_r18_stage4-unused.py'
FCN_AUX_OFF = ROOT / 'configs' / 'mmseg' / 'fcn_r18_aux-off.py'
SEGFORMER = ROOT / 'configs' / 'mmseg' / 'segformer_mit-b0_find-unused.py'
FCN_SCHEDULE = ROOT / 'configs' / 'mmseg' / 'fcn_r18_unfreeze-schedule.py'
SYNTH = ['--synthetic', '64', '64']


def train(config, work_dir, *args):
    return launch.train(config, work_dir, *SYNTH, *args)


def test_fcn_unused_stage_is_named_and_ignored_and_resume_keeps_plan(tmp_path):
    # layer4 runs on every forward and its output is dropped (out_indices): a call is no wake-up,
    # so the plan is still in force long after the probe
    code, out = train(FCN_STAGE4, tmp_path, '--iters', '40')
    assert code == 0, out[-5000:]
    report = json.loads((tmp_path / 'ddp_usage_report.json').read_text())
    never = [g for g in report['report']['groups'] if g['kind'] == 'never used']
    assert [(g['prefix'], len(g['names'])) for g in never] == [('backbone.layer4', 15)]
    plan = report['plan']
    assert plan['find_unused_parameters'] is False
    assert plan['ignore'] == never[0]['names'] and 'backbone.layer4.0.conv1.weight' in plan['ignore']
    assert '  backbone.layer4      15  8393728  never used' in out
    assert 'replicas bit-identical on 2 ranks at iteration 40' in out
    assert 'usage changed after the probe' not in out

    code, out = train(FCN_STAGE4, tmp_path, '--iters', '42', '--resume')
    assert code == 0, out[-5000:]
    assert 'resumed: applying the saved DDP plan (find_unused_parameters=False, ignore 15' in out
    assert 'Iter(train) [42/42]' in out and 'probing parameter usage' not in out
    assert 'replicas bit-identical on 2 ranks at iteration 42' in out

    # fine-tuning from that checkpoint: loaded weights-only, its plan not applied (a new run)
    code, out = train(FCN_STAGE4, tmp_path / 'fine_tune', '--iters', '2', '--cfg-options',
                           f'load_from={tmp_path / "iter_42.pth"}')
    assert code == 0, out[-5000:]
    assert f'Load checkpoint from {tmp_path / "iter_42.pth"}' in out
    assert "the checkpoint's DDP plan is not applied (load_from starts a new run)" in out
    assert 'probing parameter usage' in out and 'Iter(train) [2/2]' in out


def test_same_config_without_the_hook_crashes_with_named_error(tmp_path):
    # through the launcher: its exit code is what a user's shell sees
    code, out = launch.dist_train(FCN_STAGE4, tmp_path, *SYNTH, '--iters', '4', '--cfg-options',
                                  'custom_hooks=[]')
    assert code != 0
    assert 'Expected to have finished reduction in the prior iteration' in out
    assert 'backbone.layer4.0.conv1.weight' in out  # the wrapper's re-raise names it


def test_aux_head_switched_off_by_flag(tmp_path):
    code, out = train(FCN_AUX_OFF, tmp_path, '--iters', '5')
    assert code == 0, out[-5000:]
    plan = json.loads((tmp_path / 'ddp_usage_report.json').read_text())['plan']
    assert plan['find_unused_parameters'] is False
    assert sorted(plan['ignore']) == sorted([
        'auxiliary_head.conv_seg.weight', 'auxiliary_head.conv_seg.bias',
        'auxiliary_head.convs.0.conv.weight', 'auxiliary_head.convs.0.bn.weight',
        'auxiliary_head.convs.0.bn.bias'])
    assert 'replicas bit-identical on 2 ranks' in out


def test_segformer_find_unused_not_needed(tmp_path):
    code, out = train(SEGFORMER, tmp_path, '--iters', '4')
    assert code == 0, out[-5000:]
    plan = json.loads((tmp_path / 'ddp_usage_report.json').read_text())['plan']
    assert plan['find_unused_parameters'] is False and not plan['ignore']
    assert ('find_unused_parameters=True was not needed: no unused parameter in 3 iterations on '
            '2 ranks') in out


@pytest.mark.parametrize('config, extra, expected', [
    (FCN_AUX_OFF, ['--cfg-options', 'custom_hooks=[]'], 1),
    (FCN_AUX_OFF, [], 0),
    (SEGFORMER, [], 0),
    ('configs/mmseg/missing.py', [], 2),
])
def test_ddp_doctor_exit_codes(config, extra, expected):
    code, out = launch.doctor(config, '--size', '64', '64', '--iters', '3', *extra)
    assert code == expected, out[-5000:]
    if expected == 1:
        assert 'CRASHES under DDP' in out and 'auxiliary_head' in out
        assert "model_wrapper_cfg = dict(type='ReconfigurableDDP', find_unused_parameters=False)" in out
    if expected == 0 and config == FCN_AUX_OFF:
        assert 'thanks to its DDPAutoTuneHook' in out


def test_frozen_stages_lifted_by_the_schedule_train_on_every_rank(tmp_path):
    """frozen_stages=2 and a paramwise_cfg: MMEngine's constructor skips the frozen stages, the
    hook builds the optimizer again with them, lowers frozen_stages as it unfreezes, and DDP
    follows both changes with bit-identical replicas."""
    code, out = train(FCN_SCHEDULE, tmp_path, '--iters', '10', '--hang-timeout', '120')
    assert code == 0, out[-5000:]
    assert '(HIGHEST     ) HangWatchdogHook' in out  # --hang-timeout: watched, no false alarm
    assert 'no progress for' not in out
    assert 'optimizer built again with the 36 parameters the schedule unfreezes later' in out
    assert 'backbone.frozen_stages 2 -> 1' in out and 'backbone.frozen_stages 1 -> -1' in out
    assert 'trainable set changed at iteration 6: unfroze 15 params (backbone.layer2.0.conv1' in out
    assert 'trainable set changed at iteration 8: unfroze 21 params (backbone.stem.0.weight' in out
    assert 'replicas bit-identical on 2 ranks at iteration 10' in out
    assert 'usage changed after the probe' not in out
    before, after = (torch.load(tmp_path / f'iter_{i}.pth', map_location='cpu',
                                weights_only=False)['state_dict'] for i in (5, 10))
    for name in ('backbone.layer2.0.conv1.weight', 'backbone.stem.0.weight',
                 'backbone.layer1.0.bn1.weight'):
        assert not torch.equal(before[name], after[name]), f'{name} was never updated'
