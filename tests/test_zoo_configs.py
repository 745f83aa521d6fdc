"""Shipped configs the doctor could not run before it fed synthetic data through their own pipelines:
YOLOX (its mode-switch hook calls the MultiImageMixDataset), PIDNet (its head needs GenerateEdge's
map) and LR-ASPP (too small an input: the doctor names the smallest size that trains).

The doctor runs each as shipped (pretrained weights not on this machine dropped, batch 2). Its verdict
and its never-used set must equal an independent single-process account of the same config: which
trainable parameters one process's backward leaves without a gradient, and whether DDP as written
(``find_unused_parameters`` False) then crashes.
"""
import json
import os.path as osp

import pytest
import torch

from mmddp_hooks.doctor import dry_run
from mmddp_hooks.model_from_config import load_config
from mmddp_hooks.report import NEVER
from mmddp_hooks.synthetic import local_usage
from mmddp_hooks.upstream_fixes import dry_run_fixes

import launch

pytest.importorskip('mmdet')
mmseg = pytest.importorskip('mmseg')
pytestmark = [pytest.mark.dist, pytest.mark.mmseg, pytest.mark.mmdet]

SIZE = (64, 64)
ITERS = 2
BATCH = 'train_dataloader.batch_size=2'


def never_used_locally(config: str) -> set:
    cfg = load_config(config, {'train_dataloader.batch_size': 2})
    dry_run(cfg, SIZE, ITERS)
    torch.manual_seed(0)
    with dry_run_fixes():  # PIDNet's loss and padded labels: mmseg 1.2.2's bug, not DDP's
        trainable, used = local_usage(cfg, steps=ITERS)
    return trainable - used


@pytest.mark.parametrize('config, crashes, loaders', [
    ('mmdet::yolox/yolox_tiny_8xb8-300e_coco.py', False, 'LoadAnnotations, LoadImageFromFile'),
    ('mmseg::pidnet/pidnet-s_2xb6-120k_1024x1024-cityscapes.py', False,
     'LoadAnnotations, LoadImageFromFile'),
    ('mmpretrain::resnet/resnet18_8xb32_in1k.py', False, 'LoadImageFromFile'),
])
def test_shipped_config_runs_and_agrees_with_one_process(config, crashes, loaders):
    if config.startswith('mmpretrain'):
        pytest.importorskip('mmpretrain')
    code, out = launch.doctor(config, '--size', *SIZE, '--iters', ITERS, '--json',
                              '--cfg-options', BATCH)
    assert code == int(crashes), out[-4000:]
    found = json.loads(out[out.index('{'):])
    never = {p['name'] for p in found['report']['params'] if p['kind'] == NEVER}
    assert never == never_used_locally(config)
    assert found['crashes'] == (bool(never) and not found['asked_find_unused']) == crashes
    assert f'loading steps replaced: {loaders};' in found['data']


def test_too_small_a_size_names_the_smallest_that_trains():
    code, out = launch.doctor('mmseg::mobilenet_v3/mobilenet-v3-d8_lraspp_4xb4-320k_cityscapes-'
                              '512x1024.py', '--size', 128, 128, '--iters', 1,
                              '--cfg-options', BATCH)
    assert code == 2, out[-3000:]
    assert 'the model does not train at --size 128 128 (train size 64x128' in out
    assert 'Output size is too small' in out  # the pooling layer's own error, quoted
    hint = out[out.index('the smallest size that trains is about ') + 39:].split(' ')[0]
    h, w = map(int, hint.split('x'))
    assert 392 <= h <= 512 and w == 2 * h  # AvgPool2d(49) on 1/8 features: H >= 392; 1:2 as shipped
    assert "the config's own train size is 512x1024" in out


@pytest.mark.parametrize('name, crashes, unused', [
    ('resnet18_stage3-head', True, 'backbone.layer4'),
    ('byol_r18_momentum', False, None),
])
def test_mmpretrain_doctor_is_plain_ddp_and_the_hook_trains_as_plain_ddp(name, crashes, unused):
    pytest.importorskip('mmpretrain')
    from mmddp_hooks.ranks import run_distributed

    import config_cases

    config = osp.join('configs', 'mmpretrain', f'{name}.py')
    code, out = launch.doctor(config, '--size', *SIZE, '--iters', ITERS, '--cfg-options',
                              'custom_hooks=[]')
    assert code == int(crashes), out[-5000:]
    if unused:
        assert unused in out
    ranks = run_distributed(config_cases.plain_then_hook, 2, args=(config, SIZE), timeout=400)
    for r in ranks:
        assert (r['plain_error'] is not None) == crashes, r['plain_error']
        if crashes:
            assert unused in r['plain_error']  # the wrapper's re-raise names it
        assert r['reference_error'] is None and r['hooked_error'] is None, r
        assert r['bit_equal'], 'the hook trained differently from plain DDP'
    assert ranks[0]['digest'] == ranks[1]['digest'], 'replicas diverged'
