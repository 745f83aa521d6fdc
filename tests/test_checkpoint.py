"""Checkpoints load weights-only with MMEngine's own types allowed; nothing in a checkpoint runs code.

Every test that refuses a file proves the payload did not run: it would have written a marker file.
"""
import argparse
import os
import pickle
from pathlib import Path

import pytest
import torch
from mmengine.runner import Runner

from mmddp_hooks.checkpoint import TRUST_KEY, UntrustedCheckpointError, safe_checkpoint_loading

import launch
import scenarios

ROOT = Path(__file__).parents[1]


class _Payload:
    """Unpickling this runs a shell command that writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def _runner(work_dir: Path, iters: int, **kw) -> Runner:
    return Runner(
        model=scenarios.AllUsed(), work_dir=str(work_dir), experiment_name=f'exp{iters}',
        train_dataloader=dict(dataset=scenarios.RandomVectors(), batch_size=4, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=True),
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=1e-4)),
        param_scheduler=[dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=2)],
        train_cfg=dict(by_epoch=False, max_iters=iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False)),
        custom_hooks=[dict(type='EMAHook')], randomness=dict(seed=0), log_level='WARNING', **kw)


@pytest.fixture(scope='module')
def runner_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint as MMEngine 0.10.7 writes it: message hub, optimizer, scheduler, EMA, meta."""
    work_dir = tmp_path_factory.mktemp('written')
    _runner(work_dir, 4).train()
    return work_dir / 'iter_4.pth'


def _with(path: Path, out: Path, **extra) -> Path:
    ckpt = torch.load(path, weights_only=False)  # the test's own file, to derive variants from
    ckpt['meta'].update(extra)
    torch.save(ckpt, out)
    return out


def test_runner_checkpoint_needs_more_than_torch_allows(runner_checkpoint):
    with pytest.raises(pickle.UnpicklingError):
        torch.load(runner_checkpoint, weights_only=True)  # what torch >= 2.6 does by default


def test_resume_and_load_from_of_runner_checkpoints(runner_checkpoint, tmp_path):
    resumed = _runner(runner_checkpoint.parent, 6, resume=True)
    with safe_checkpoint_loading():
        resumed.train()
    assert resumed.iter == 6
    lr_history, _ = resumed.message_hub.get_scalar('train/lr').data
    assert len(lr_history) == 6  # 4 restored from the checkpoint's HistoryBuffer, 2 new
    loaded = _runner(tmp_path, 2, load_from=str(runner_checkpoint))
    with safe_checkpoint_loading():
        loaded.train()
    assert loaded.iter == 2
    assert torch.load is torch.serialization.load  # restored after the block


def test_code_in_a_checkpoint_does_not_run(runner_checkpoint, tmp_path):
    marker = tmp_path / 'payload_ran'
    evil = _with(runner_checkpoint, tmp_path / 'evil.pth', payload=_Payload(marker))
    runner = _runner(tmp_path / 'work', 2, load_from=str(evil))
    with pytest.raises(UntrustedCheckpointError) as info, safe_checkpoint_loading():
        runner.train()
    message = str(info.value)
    assert f'refused to load {evil}: it holds posix.system' in message
    assert f'--trust-checkpoint {evil}' in message and f"{TRUST_KEY} = ['{evil}']" in message
    assert not marker.exists()
    with pytest.raises(UntrustedCheckpointError), safe_checkpoint_loading():
        torch.load(evil, weights_only=False)  # an explicit False (torch.hub passes it) is overridden
    assert not marker.exists()


def test_torchscript_archive_is_refused_before_torch_jit_runs_it(tmp_path):
    scripted = tmp_path / 'scripted.pth'
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    with pytest.raises(UntrustedCheckpointError, match='TorchScript archive'), \
            safe_checkpoint_loading():
        torch.load(scripted)


def test_a_trusted_url_trusts_its_download_only(runner_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    (tmp_path / 'hub' / 'checkpoints').mkdir(parents=True)
    meta = dict(args=argparse.Namespace(lr=0.3))
    download = _with(runner_checkpoint, tmp_path / 'hub' / 'checkpoints' / 'model.pth', **meta)
    elsewhere = _with(runner_checkpoint, tmp_path / 'model.pth', **meta)  # same name, other place
    with safe_checkpoint_loading(trusted=['https://example.org/weights/model.pth']):
        assert torch.load(download)['meta']['args'].lr == 0.3
        with pytest.raises(UntrustedCheckpointError):
            torch.load(elsewhere)


def test_trust_applies_to_the_named_file_only(runner_checkpoint, tmp_path):
    odd = _with(runner_checkpoint, tmp_path / 'odd.pth', args=argparse.Namespace(lr=0.1))
    other = _with(runner_checkpoint, tmp_path / 'other.pth', args=argparse.Namespace(lr=0.2))
    with safe_checkpoint_loading(trusted=[str(odd)]):
        assert torch.load(odd)['meta']['args'].lr == 0.1
        with pytest.raises(UntrustedCheckpointError, match='argparse.Namespace'):
            torch.load(other)


@pytest.mark.dist
@pytest.mark.mmseg
def test_train_py_refuses_a_payload_and_trusts_on_request(tmp_path):
    marker = tmp_path / 'payload_ran'
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'payload': _Payload(marker)}, evil)
    # tools/train.py's main on one rank (launch.train): a user's `python tools/train.py ...`
    args = [ROOT / 'configs/mmseg/fcn_r18_stage4-unused.py', tmp_path / 'work', '--synthetic', '64', '64',
            '--iters', '1', '--cfg-options', f'load_from={evil}']
    code, out = launch.train(*args, nproc=1, launcher='none')
    assert code != 0
    assert 'UntrustedCheckpointError' in out and 'posix.system' in out
    assert not marker.exists()
    code, out = launch.train(*args, '--trust-checkpoint', evil, nproc=1, launcher='none')
    assert marker.exists(), out[-3000:]  # trusted on request: full unpickling, as asked
