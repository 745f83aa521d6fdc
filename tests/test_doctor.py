"""The doctor's verdict comes from what the ranks reported, not from how they exited afterwards."""
from mmddp_hooks import doctor, testing
from mmddp_hooks.testing import DistRunResult, RankResult

FINDINGS = dict(crashes=True, auto=dict(find_unused_parameters=False, reasons=[]))


def _fake_run(ranks):
    def run_on_ranks(*args, **kwargs):
        return DistRunResult(world_size=len(ranks), timed_out=False, elapsed=1.0, ranks=ranks)
    return run_on_ranks


def test_a_rank_that_dies_at_exit_after_reporting_keeps_the_verdict(monkeypatch):
    monkeypatch.setattr(testing, 'run_on_ranks', _fake_run([
        RankResult(0, 0, value=dict(FINDINGS), has_value=True),
        RankResult(1, -6, value=None, has_value=True,
                   output='terminate called without an active exception')]))
    out = doctor.run_doctor('some_config.py')
    assert out['status'] == doctor.CRASHES
    assert 'rank 1: finished its work, then died at exit (exit code -6)' in out['teardown_fault']
    assert 'terminate called without an active exception' in out['teardown_fault']


def test_a_rank_that_failed_its_work_means_the_doctor_could_not_run(monkeypatch):
    monkeypatch.setattr(testing, 'run_on_ranks', _fake_run([
        RankResult(0, 0, value=dict(FINDINGS), has_value=True),
        RankResult(1, 1, error='Traceback ...\nValueError: bad config')]))
    out = doctor.run_doctor('some_config.py')
    assert out['status'] == doctor.FAILED and 'ValueError: bad config' in out['error']
