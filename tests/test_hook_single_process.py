"""The hook in a non-distributed run, and its argument checks: no process group needed."""
import pytest
from mmengine.runner import Runner

from mmddp_hooks import DDPAutoTuneHook

import scenarios


def test_single_process_run_is_left_alone(tmp_path, capsys):
    runner = Runner(
        model=scenarios.DisabledDistill(), work_dir=str(tmp_path), experiment_name='single',
        train_dataloader=dict(dataset=scenarios.RandomVectors(8), batch_size=2, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=2),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        custom_hooks=[dict(type='DDPAutoTuneHook', probe_iters=1)],
        cfg=dict(find_unused_parameters=True, model_wrapper_cfg=dict(type='ReconfigurableDDP')),
        default_hooks=dict(checkpoint=None), log_level='INFO')
    runner.train()
    captured = capsys.readouterr()
    assert 'not a distributed run: DDPAutoTuneHook does nothing' in captured.out + captured.err
    # the top-level key MMEngine will not pass to DDP is named, with the one that decides
    assert ('[mmddp_hooks] top-level find_unused_parameters=True is ignored: model_wrapper_cfg is '
            'given') in captured.out + captured.err
    assert not (tmp_path / 'ddp_usage_report.json').exists()


@pytest.mark.parametrize('kwargs, match', [
    (dict(probe_iters=0), 'probe_iters must be >= 1'),
    (dict(policy='fastest'), "policy must be one of"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DDPAutoTuneHook(**kwargs)
