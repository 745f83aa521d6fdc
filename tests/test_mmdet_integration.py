"""Real mmdetection 3.3.0 configs (configs/mmdet/, cut down for CPU) on 2 gloo ranks with synthetic
boxes and masks: the doctor's verdict is what plain DDP does, and the hook trains as plain DDP.

Per config: the doctor on the config without its hook; then, in one 2-rank launch (tests/
config_cases.py), plain DDP as the config writes it, plain DDP with ``find_unused_parameters=True``
where that crashes (the reference), and the config with its hook. The hook's final weights must equal
the reference's bit for bit (2 ranks, same seed and data) and the replicas must be identical.
"""
import pytest

from mmddp_hooks.ranks import run_distributed

import config_cases
import launch

pytest.importorskip('mmdet')
pytestmark = [pytest.mark.dist, pytest.mark.mmdet]

# config, what the doctor must say (0 trains as written, 1 crashes), what plain DDP names
CASES = {
    'retinanet': ('configs/mmdet/retinanet_r18_fpn_128.py', 0, None),
    'mask_rcnn': ('configs/mmdet/mask-rcnn_r18_fpn_128.py', 0, None),
    'detr': ('configs/mmdet/detr_r18_128.py', 0, None),
    'yolov3': ('configs/mmdet/yolov3_mobilenetv2_128.py', 1, 'backbone.conv2.conv.weight'),
}


@pytest.mark.parametrize('name', list(CASES))
def test_doctor_verdict_is_plain_ddp_and_the_hook_trains_as_plain_ddp(name):
    config, verdict, unused = CASES[name]
    code, out = launch.doctor(config, '--size', '128', '128', '--iters', '2', '--cfg-options',
                              'custom_hooks=[]')
    assert code == verdict, out[-5000:]
    if verdict == 1:
        assert 'warning: top-level find_unused_parameters=True is ignored' in out
        assert unused in out

    ranks = run_distributed(config_cases.plain_then_hook, 2, args=(config,), timeout=400)
    for r in ranks:
        assert (r['plain_error'] is not None) == (verdict == 1), r['plain_error']
        if verdict == 1:
            assert 'Expected to have finished reduction in the prior iteration' in r['plain_error']
            assert unused in r['plain_error']  # the wrapper's re-raise names it
        assert r['reference_error'] is None and r['hooked_error'] is None, r
        assert r['bit_equal'], 'the hook trained differently from plain DDP'
        assert r['switch_log'] == [] and r['find_unused'] is False
    assert ranks[0]['digest'] == ranks[1]['digest'], 'replicas diverged'
