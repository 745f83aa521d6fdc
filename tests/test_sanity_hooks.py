"""Distributed sanity hooks on 2 gloo ranks through a real Runner: each bad setup is named."""
import pytest
import torch

from mmddp_hooks.compat import detail_segfaults_on_gloo
from mmddp_hooks.hooks.dist_debug_level_hook import DistDebugLevelHook
from mmddp_hooks.hooks.grad_layout_hook import contiguous_strides, layout_mismatches
from mmddp_hooks.ranks import run_distributed, run_on_ranks

import sanity_cases

STRIDE_WARNING = 'Grad strides do not match bucket view strides'


def _fails_with(fn, match, **kw):
    result = run_on_ranks(fn, 2, timeout=120, failure_grace=5, **kw)
    assert not result.ok
    errors = '\n'.join(r.error or '' for r in result.ranks)
    assert match in errors, result.describe()[-4000:]
    return errors


@pytest.mark.dist
def test_good_setup_passes_silently():
    result = run_on_ranks(sanity_cases.train, 2, timeout=120)
    values = result.values()
    assert values[0]['digest'] == values[1]['digest']
    for r in result.ranks:
        assert '[mmddp_hooks]' not in r.output and STRIDE_WARNING not in r.output


@pytest.mark.dist
def test_nested_wrapper_is_named():
    _fails_with(sanity_cases.train, "ReconfigurableDDP wraps a model that already contains model "
                                    "wrappers: 'trunk' (DistributedDataParallel)",
                args=(dict(nested_ddp=True),), init_process_group=False)


@pytest.mark.dist
def test_model_wrapped_by_hand_and_by_the_runner():
    _fails_with(sanity_cases.train, 'are also driven by another live DistributedDataParallel',
                kwargs=dict(prewrap_and_leak=True), init_process_group=False)


@pytest.mark.dist
def test_sampler_built_before_init_process_group():
    _fails_with(sanity_cases.sampler_built_before_init,
                'the train sampler DefaultSampler partitions for world_size=1, rank=0, but this '
                'process is rank', init_process_group=False)


@pytest.mark.dist
def test_plain_random_sampler_in_ddp():
    _fails_with(sanity_cases.plain_random_sampler, 'the train sampler RandomSampler does not '
                'shard the data: every one of the 2 ranks trains on the same samples',
                init_process_group=False)


@pytest.mark.dist
def test_identical_first_batch_on_every_rank():
    _fails_with(sanity_cases.same_data_on_every_rank, 'the first batch is identical on all 2 '
                'ranks: every rank trains on the same data', init_process_group=False)


@pytest.mark.dist
@pytest.mark.parametrize('kernel, what', [(3, '2 parameters with a different memory layout'),
                                          (1, '0 parameters with a different memory layout')])
def test_channels_last_after_wrapping_is_fixed(kernel, what):
    model_kw = dict(kernel=kernel, channels_last_in_init_weights=True)
    # fresh: torch warns about the strides once per process: this run must be that process's first
    plain = run_on_ranks(sanity_cases.train, 2, args=(model_kw,), kwargs=dict(hooks=[]),
                         timeout=120, init_process_group=False, fresh=True)
    fixed = run_on_ranks(sanity_cases.train, 2, args=(model_kw,), timeout=120,
                         init_process_group=False)
    reference = run_distributed(sanity_cases.train, 2, args=(dict(kernel=kernel),),
                                kwargs=dict(hooks=[]), timeout=120, init_process_group=False)
    assert STRIDE_WARNING in plain.ranks[0].output  # the problem is real without the hook
    assert STRIDE_WARNING not in fixed.ranks[0].output + fixed.ranks[1].output
    assert what in fixed.ranks[0].output and 'rebuilt DDP so its buckets follow' in \
        fixed.ranks[0].output
    # the fix trains like a model that was never converted late (float tolerance)
    a, b = reference[0]['params'], fixed.values()[0]['params']
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_layout_classification():
    shapes = {'w3': (4, 2, 3, 3), 'w1': (4, 2, 1, 1), 'b': (4,)}
    cl = {'w3': (18, 1, 6, 2), 'w1': (2, 1, 2, 2), 'b': (1,)}
    built = {k: contiguous_strides(s) for k, s in shapes.items()}
    assert built['w1'] == (2, 1, 1, 1)
    assert layout_mismatches(shapes, cl, built) == (['w3'], ['w1'])
    real = torch.empty(4, 2, 3, 3).to(memory_format=torch.channels_last)
    assert real.stride() == cl['w3']


def test_debug_level_detail_is_refused_where_it_segfaults():
    assert detail_segfaults_on_gloo('2.13.0+cpu') and not detail_segfaults_on_gloo('2.5.1')
    with pytest.raises(ValueError, match='level must be one of'):
        DistDebugLevelHook('VERBOSE')


def _debug_levels():
    from mmddp_hooks.hooks.dist_debug_level_hook import DistDebugLevelHook

    class R:
        class logger:
            @staticmethod
            def info(msg):
                print(msg)
    DistDebugLevelHook('INFO').before_run(R)
    import torch.distributed as dist
    level = str(dist.get_debug_level())
    try:
        DistDebugLevelHook('DETAIL').before_run(R)
    except ValueError as e:
        return level, str(e)
    return level, str(dist.get_debug_level())


@pytest.mark.dist
def test_debug_level_set_in_code():
    level, detail = run_distributed(_debug_levels, 2, timeout=60)[0]
    assert level.endswith('INFO')
    if detail_segfaults_on_gloo():
        assert detail.startswith('DistDebugLevelHook: level=DETAIL segfaults when DDP is built on gloo')
    else:
        assert detail.endswith('DETAIL')
