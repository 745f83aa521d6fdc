"""The doctor's verdict comes from what the ranks reported, not from how they exited afterwards."""
from mmddp_hooks import doctor, ranks
from mmddp_hooks.ranks import DistRunResult, RankResult

FINDINGS = dict(crashes=True, auto=dict(find_unused_parameters=False, reasons=[]))


def _fake_run(ranks):
    def run_on_ranks(*args, **kwargs):
        return DistRunResult(world_size=len(ranks), timed_out=False, elapsed=1.0, ranks=ranks)
    return run_on_ranks


def test_a_rank_that_dies_at_exit_after_reporting_keeps_the_verdict(monkeypatch):
    monkeypatch.setattr(ranks, 'run_on_ranks', _fake_run([
        RankResult(0, 0, value=dict(FINDINGS), has_value=True),
        RankResult(1, -6, value=None, has_value=True,
                   output='terminate called without an active exception')]))
    out = doctor.run_doctor('some_config.py')
    assert out['status'] == doctor.CRASHES
    assert 'rank 1: finished its work, then died at exit (exit code -6)' in out['teardown_fault']
    assert 'terminate called without an active exception' in out['teardown_fault']


def test_a_rank_that_failed_its_work_means_the_doctor_could_not_run(monkeypatch):
    monkeypatch.setattr(ranks, 'run_on_ranks', _fake_run([
        RankResult(0, 0, value=dict(FINDINGS), has_value=True),
        RankResult(1, 1, error='Traceback ...\nValueError: bad config')]))
    out = doctor.run_doctor('some_config.py')
    assert out['status'] == doctor.FAILED and 'ValueError: bad config' in out['error']


def test_a_zoo_run_tabulates_each_config_and_retries_a_too_small_size(monkeypatch, tmp_path, capsys):
    import json
    from pathlib import Path

    import ddp_doctor

    counts = {'always used': 10, 'never used': 3, 'used on some ranks only': 0, 'dynamic': 1}
    good = dict(status=doctor.CRASHES, report=dict(counts=counts), crash_reason='unused',
                crashes_without_hook=True,
                settings=dict(find_unused_parameters=False, find_unused_parameters_from='not set',
                              static_graph=False),
                auto_summary='find_unused_parameters=False, ignore 3 never-used params')
    calls = []

    def run_doctor(config, nproc, iters, size, *args, **kwargs):
        calls.append((Path(config).name, tuple(size)))
        if config.endswith('small.py') and tuple(size) == (64, 64):
            return dict(status=doctor.FAILED, error='rank 0: RuntimeError: Output size is too small',
                        size_hint=dict(smallest=[416, 832], message='needs 416x832'))
        if config.endswith('broken.py'):
            return dict(status=doctor.FAILED, size_hint=None, error=(
                '--- rank 1: FAILED\nRuntimeError: [gloo] Connection closed by peer\n'  # a symptom
                '--- rank 0: FAILED\nTraceback\nKeyError: oops\n'))
        return good

    monkeypatch.setattr(doctor, 'run_doctor', run_doctor)
    monkeypatch.setattr(doctor, 'preflight', lambda *args: None)
    listed = tmp_path / 'zoo.txt'
    listed.write_text('a/ok.py  # a comment\n\na/small.py\n')
    argv = ['a/broken.py', '--list', str(listed), '--size', '64', '64', '--out',
            str(tmp_path / 'table.md')]
    assert ddp_doctor.main(argv) == doctor.FAILED  # one could not run
    table = capsys.readouterr().out
    assert (tmp_path / 'table.md').read_text() == table
    assert calls == [('broken.py', (64, 64)), ('ok.py', (64, 64)), ('small.py', (64, 64)),
                     ('small.py', (416, 832))]
    lines = table.splitlines()
    assert lines[0].startswith('| config | effective settings | never | rank-dep. | dynamic |')
    assert lines[2].startswith('| broken |  |') and 'could not run: KeyError: oops' in lines[2]
    assert lines[3].startswith('| ok | find_unused_parameters=False (not set) | 3 | 0 | 1 | CRASHES')
    assert lines[4].startswith('| small (416x832: 64x64 too small) |')

    assert ddp_doctor.main(['a/ok.py', 'a/small.py', '--json', '--size', '64', '64']) == doctor.OK
    found = json.loads(capsys.readouterr().out)  # one JSON object, its rows under 'configs'
    rows = found['configs']
    assert found['status'] == doctor.OK
    assert [r['status'] for r in rows] == ['CRASHES', 'CRASHES'] and rows[0]['never'] == 3


def test_the_default_batch_is_the_configs_lowered_to_two_never_raised():
    from mmengine.config import Config

    def batch(own, asked):
        cfg = Config(dict(train_dataloader=dict(batch_size=own)))
        said, changed = doctor._set_batch_size(cfg, asked)
        return cfg.train_dataloader.batch_size, said, changed

    assert batch(1, None) == (1, "per-rank batch 1 (the config's)", False)
    assert batch(2, None) == (2, "per-rank batch 2 (the config's)", False)
    assert batch(16, None) == (2, "per-rank batch 2 (lowered from the config's 16; --batch-size N "
                                  "sets another, --batch-size 0 keeps the config's)", True)
    assert batch(16, 0) == (16, "per-rank batch 16 (the config's)", False)
    assert batch(1, 4) == (4, "per-rank batch 4 (--batch-size; the config's is 1)", True)


def test_a_new_style_config_on_mmengine_before_0_8_names_the_version(monkeypatch):
    """mmengine 0.7 has no read_base: the doctor says that, not that mmengine.config is missing."""
    from mmddp_hooks import doctor_failure

    monkeypatch.setattr(doctor_failure, 'lazy_configs_supported', lambda: False)
    monkeypatch.setattr(doctor_failure, 'mmengine_release', lambda: (0, 7, 1))
    err = ImportError("cannot import name 'read_base' from 'mmengine.config'", name='mmengine.config')
    failure = doctor_failure.classify(err, doctor_failure.LOADING, 'configs/x.py')
    assert failure['kind'] == 'mmengine version', failure
    assert failure['cause'] == ('configs/x.py is a new-style config (`with read_base():`), which '
                                'mmengine reads from 0.8 on; mmengine 0.7.1 is installed')
    assert 'pip install "mmengine>=0.8,<1.0"' in failure['todo']


def test_a_rank_that_raised_as_it_started_is_the_cause_not_the_rank_killed_after_it(monkeypatch):
    error = ('Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
             'torch.distributed.DistNetworkError: The server socket has failed to listen on any '
             'local network address. port: 20004, useIpv6: false, code: -98, name: EADDRINUSE')
    monkeypatch.setattr(ranks, 'run_on_ranks', _fake_run([
        RankResult(0, -9, error=error),
        RankResult(1, -9, error='rank produced no result: killed after a timeout or a peer failure')]))
    out = doctor.run_doctor('some_config.py')
    assert out['status'] == doctor.FAILED and out['failure']['rank'] == 0, out
    assert out['error'] == (
        'ddp_doctor stopped while starting the ranks on rank 0, before a verdict: '
        'torch.distributed.DistNetworkError: The server socket has failed to listen on any local '
        'network address. port: 20004, useIpv6: false, code: -98, name: EADDRINUSE. --debug prints '
        "every rank's traceback. Rank 1 was then stopped by the doctor (a consequence of the error "
        'above, not a cause).')
