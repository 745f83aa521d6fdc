"""The benchmark tool end to end in --quick mode: output shape, and invalid settings flagged."""
import json
from pathlib import Path

import benchmark_ddp
import pytest


@pytest.mark.dist
def test_quick_benchmark_flags_invalid_settings(tmp_path, capsys):
    out_json, out_png = tmp_path / 'bench.json', tmp_path / 'bench.png'
    assert benchmark_ddp.main(['--quick', '--scenarios', 'fixed_unused', 'dynamic',
                               '--json', str(out_json), '--plot', str(out_png)]) == 0
    table = capsys.readouterr().out
    assert table.startswith('| scenario | setting | median step (slowest rank) |')
    results = {r['scenario']: r for r in json.loads(out_json.read_text())['results']}
    assert set(results) == {'fixed_unused', 'dynamic'}
    rows = {s: {r['setting']: r for r in res['rows']} for s, res in results.items()}
    fixed, dynamic = rows['fixed_unused'], rows['dynamic']
    assert not fixed['find_unused=False']['valid']
    assert fixed['find_unused=False']['error'].startswith(
        'DDP: Expected to have finished reduction in the prior iteration')
    assert fixed['ignore_unused']['valid'] and fixed['freeze_unused']['valid']
    assert fixed['auto']['valid'] and results['fixed_unused']['plan'] == \
        'find_unused_parameters=False, ignore 4 never-used params'
    assert results['fixed_unused']['switches'] == [] and results['dynamic']['switches'] == []
    for name in ('find_unused=False', 'ignore_unused', 'freeze_unused', 'static_graph'):
        assert not dynamic[name]['valid'], name
    assert dynamic['find_unused=True']['valid']
    assert results['dynamic']['plan'] == 'find_unused_parameters=True'
    best = results['fixed_unused']['best']
    assert fixed[best]['ratio'] == 1.0 and best != 'auto'
    for res in results.values():
        for row in res['rows']:
            if row['valid']:
                assert row['median_ms'] > 0 and row['ratio_min'] <= row['ratio'] <= row['ratio_max']
    for res in results.values():  # the watchdog's cost: 2 pairs of on/off blocks, no false alarm
        w = res['watchdog']
        assert len(w['ratios']) == 2 and all(r > 0 for r in w['ratios']) and w['reports'] == 0
        assert w['per_block'] >= 10 and w['on_ms'] > 0 and w['interval'] == 0.1
        assert w['beats'] >= 2  # its thread ran in the on blocks (0.3 s each)
    assert table.count('| auto + HangWatchdogHook (heartbeat every 0.1 s) |') == 2
    assert out_png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.mmseg
def test_every_setting_s_mmseg_replica_trains_on_the_same_batch():
    """The FCN scenario's settings are compared parameter for parameter after warm-up: its random
    crops and flips must give every replica the same batch (they did not, and every setting was
    reported as training differently from find_unused=True)."""
    pytest.importorskip('mmseg')
    import torch

    from benchmarks.benchmark import MMSegStep

    config = str(Path(__file__).parents[1] / 'configs' / 'mmseg' / 'fcn_r18_stage4-unused.py')
    a, b = MMSegStep(config), MMSegStep(config)
    assert torch.equal(a.data['inputs'], b.data['inputs'])
    assert all(torch.equal(x.gt_sem_seg.data, y.gt_sem_seg.data)
               for x, y in zip(a.data['data_samples'], b.data['data_samples']))


@pytest.mark.dist
@pytest.mark.needs('torchvision')
def test_real_models_path_runs_on_cpu(tmp_path, capsys):
    """What --device cuda runs (real models, the four settings against the baseline, interleaved),
    with --models real --quick on gloo: a ResNet-18 and a one-block ViT, each with an unused head."""
    from benchmarks.benchmark import REAL_SETTINGS

    out_json, out_png = tmp_path / 'real.json', tmp_path / 'real.png'
    assert benchmark_ddp.main(['--device', 'cpu', '--models', 'real', '--quick',
                               '--json', str(out_json), '--plot', str(out_png)]) == 0
    assert '| resnet18_b2 | ignore_unused (baseline) |' in capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data['device'] == 'cpu' and data['nproc'] == 1 and data['torchvision']
    assert [r['scenario'] for r in data['results']] == ['resnet18_b2', 'tiny_vit_b2']
    for res in data['results']:
        assert res['best'] == res['baseline'] == 'ignore_unused'
        assert res['plan'] == 'find_unused_parameters=False, ignore 2 never-used params'
        rows = {r['setting']: r for r in res['rows']}
        assert list(rows) == list(REAL_SETTINGS) and all(r['valid'] for r in rows.values()), rows
        assert rows['ignore_unused']['ratio'] == 1.0 and rows['auto']['median_ms'] > 0
    assert out_png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.needs('torchvision')
@pytest.mark.parametrize('arch, head, kwargs', [('resnet50', 'fc', {}),
                                                ('vit_b_16', 'heads.head', dict(image_size=32))])
def test_real_models_leave_only_their_extra_head_unused(arch, head, kwargs):
    """The GPU benchmark's torchvision models, full width and depth, on 32 x 32 images on CPU: one
    backward reaches every parameter but the extra head's, which is shaped like the real one."""
    from benchmarks.benchmark import TorchvisionStep, real_scenarios

    assert {s['arch'] for s in real_scenarios().values() if 'arch' in s} == {'resnet50', 'vit_b_16'}
    step = TorchvisionStep(arch, batch=2, image=32, **kwargs)
    step(None, 0).backward()
    assert sorted(n for n, p in step.named_parameters() if p.grad is None) == [
        'unused_head.bias', 'unused_head.weight']
    assert step.unused_head.weight.shape == step.get_parameter(f'net.{head}.weight').shape


def test_keep_alive_terms_are_measured_against_the_plan_without_them(tmp_path, capsys):
    out_json = tmp_path / 'keepalive.json'
    assert benchmark_ddp.main(['--keepalive', '--quick', '--json', str(out_json)]) == 0
    table = capsys.readouterr().out
    assert table.startswith('| keep-alive terms + find_unused_parameters=False vs the plan')
    res = json.loads(out_json.read_text())['keepalive']
    assert res['plan'] == 'find_unused_parameters=True' and res['rounds'] == 6
    assert res['step_ratio_min'] <= res['step_ratio'] <= res['step_ratio_max']
    # the same buckets either way; find_unused_parameters=True adds its used-parameter map
    assert res['bucket_bytes_ratio'] == 1.0 and res['used_map_bytes'] == 4 * 14
    assert res['max_param_diff'] > 0  # zero gradients are not None: the two train differently


@pytest.mark.dist
def test_the_guard_s_host_work_is_timed_part_by_part(tmp_path, capsys):
    """300 watched tensors, gradients None or zeros after each step, 2 ranks: every part timed,
    the exchange apart. Times are reported, not bounded here (a shared machine's load decides
    them): tests/test_guard_grad_reads.py counts the guard's work per step instead."""
    out_json = tmp_path / 'guard.json'
    assert benchmark_ddp.main(['--guard-cost', '--nproc', '2', '--guard-models', 'linears300',
                               '--rounds', '30', '--json', str(out_json)]) == 0
    assert capsys.readouterr().out.startswith('| model | ranks | watched tensors |')
    rows = json.loads(out_json.read_text())['rows']
    assert [(r['model'], r['zero_grad'], r['watched']) for r in rows] == [
        ('linears300', 'set_to_none', 302), ('linears300', 'zeros', 302)]
    for r in rows:
        m = r['median_us']
        # the slowest rank's median of each part, and of their sum
        assert m['exchange'] > 0 and m['host'] >= max(m['before_backward'], m['after_backward'],
                                                      m['after_step']) > 0, r
