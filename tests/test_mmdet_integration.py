"""Real mmdetection 3.3.0 configs (configs/mmdet/, cut down for CPU) on 2 gloo ranks with synthetic
boxes and masks: the doctor's verdict is what plain DDP does, and the hook trains as plain DDP.

Per config: the doctor; the same config without the hook (plain DDP as the config writes it); where
that crashes, plain DDP with ``find_unused_parameters=True``, the reference; then with the hook. The
final weights with the hook must equal the reference's bit for bit (2 ranks, same seed and data).
"""
import pytest
import torch

from mmddp_hooks.checkpoint import safe_checkpoint_loading

import launch

pytest.importorskip('mmdet')
pytestmark = [pytest.mark.dist, pytest.mark.mmdet]

ITERS = 4
SYNTH = ['--synthetic', '128', '128', '--iters', str(ITERS)]
# config, what the doctor must say (0 trains as written, 1 crashes), what the plan ignores
CASES = {
    'retinanet': ('configs/mmdet/retinanet_r18_fpn_128.py', 0, []),
    'mask_rcnn': ('configs/mmdet/mask-rcnn_r18_fpn_128.py', 0, []),
    'detr': ('configs/mmdet/detr_r18_128.py', 0, []),
    'yolov3': ('configs/mmdet/yolov3_mobilenetv2_128.py', 1, ['backbone.conv2.conv.weight',
                                                               'backbone.conv2.bn.weight',
                                                               'backbone.conv2.bn.bias']),
}


def _weights(work_dir):
    with safe_checkpoint_loading():
        return torch.load(work_dir / f'iter_{ITERS}.pth', map_location='cpu')['state_dict']


@pytest.mark.parametrize('name', list(CASES))
def test_doctor_verdict_is_plain_ddp_and_the_hook_trains_as_plain_ddp(name, tmp_path):
    config, verdict, ignored = CASES[name]
    # the doctor on the config without its hook: the verdict on what plain DDP will do
    code, out = launch.doctor(config, '--size', '128', '128', '--iters', '2', '--cfg-options',
                              'custom_hooks=[]')
    assert code == verdict, out[-5000:]

    code, plain = launch.dist_train(config, tmp_path / 'plain', *SYNTH,
                                    '--cfg-options', 'custom_hooks=[]')
    assert (code != 0) == (verdict == 1), plain[-5000:]
    reference = tmp_path / 'plain'
    if verdict == 1:
        assert 'Expected to have finished reduction in the prior iteration' in plain
        assert ignored[0] in plain  # the wrapper's re-raise names the parameter
        assert 'warning: top-level find_unused_parameters=True is ignored' in out
        code, true = launch.dist_train(config, tmp_path / 'true', *SYNTH, '--cfg-options',
                                       'custom_hooks=[]', 'model_wrapper_cfg.find_unused_parameters=True')
        assert code == 0, true[-5000:]
        reference = tmp_path / 'true'

    code, hooked = launch.dist_train(config, tmp_path / 'hook', *SYNTH)
    assert code == 0, hooked[-5000:]
    assert f'replicas bit-identical on 2 ranks at iteration {ITERS}' in hooked
    assert 'usage changed after the probe' not in hooked
    want, got = _weights(reference), _weights(tmp_path / 'hook')
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), \
        [k for k in want if not torch.equal(want[k], got[k])][:5]
    report = (tmp_path / 'hook' / 'ddp_usage_report.json').read_text()
    assert all(n in report for n in ignored)
