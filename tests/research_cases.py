"""Research-style code on ranks: the two-kinds example (configs/examples/two_kinds) trained as
written with plain DDP, with find_unused_parameters=True and with DDPAutoTuneHook; its usage per
batch kind in one process (the truth the doctor is checked against); and models that fail the way
research code does (a file their __init__ loads, a hard-coded 'cuda', a rank the kernel kills, a
rank that raises, an init_weights that raises, a visualizer backend whose module is missing)."""
import os
import signal
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Dict, Optional, Set, Tuple

import numpy as np
import torch
import torch.distributed as dist
from mmengine.model import BaseModel
from mmengine.registry import VISBACKENDS
from mmengine.visualization import LocalVisBackend
from torch import nn

from mmddp_hooks.checkpoint import safe_checkpoint_loading
from mmddp_hooks.model_from_config import build_model, load_config

import scenarios

EXAMPLES = 'configs/examples/two_kinds'
SGD = dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=1e-2)


def usage_per_kind(config: str) -> Dict[str, Set[str]]:
    """One process, no DDP: which trainable parameters a batch of each kind gives a gradient."""
    from projects.two_kinds import make_batch

    torch.manual_seed(0)
    model = build_model(load_config(config))
    out = dict(trainable={n for n, p in model.named_parameters() if p.requires_grad})
    for index, kind in enumerate(('det', 'sam')):  # make_batch: even indices 'det', odd 'sam'
        model.zero_grad(set_to_none=True)
        data = model.data_preprocessor(make_batch(index, 2), True)
        loss, _ = model.parse_losses(model(**data, mode='loss'))
        loss.backward()
        out[kind] = {n for n, p in model.named_parameters() if p.grad is not None}
    return out


def _train(config: str, iters: int, find_unused: bool = False,
           hook: Optional[dict] = None) -> Dict[str, Any]:
    """The example config on this rank through Runner.from_cfg, on its make_batch batches (2 per
    rank), with SGD, momentum and weight decay; its loss curve and final parameters, or its error."""
    from mmengine.runner import Runner

    from mmddp_hooks.synthetic import use_batch_builder

    cfg = load_config(config)
    cfg.train_dataloader.batch_size = 2
    use_batch_builder(cfg, cfg.ddp_doctor.synthetic_batch, iters)
    cfg.optim_wrapper = dict(optimizer=SGD)
    cfg.model_wrapper_cfg = dict(type='ReconfigurableDDP', find_unused_parameters=find_unused)
    cfg.custom_hooks = [dict(type='DDPAutoTuneHook', **hook)] if hook else []
    cfg.default_hooks = dict(logger=dict(type='LoggerHook', interval=50), checkpoint=None)
    cfg.update(work_dir=tempfile.mkdtemp(prefix='mmddp_two_kinds_'), launcher='pytorch',
               env_cfg=dict(dist_cfg=dict(backend='gloo')), log_level='WARNING')
    recorder = scenarios.LossRecorder()
    try:
        with safe_checkpoint_loading():
            runner = Runner.from_cfg(cfg)
            runner.register_hook(recorder)
            runner.train()
    except RuntimeError as e:
        return dict(error=str(e))
    tune = next((h for h in runner.hooks if type(h).__name__ == 'DDPAutoTuneHook'), None)
    return dict(error=None, losses=recorder.losses, digest=scenarios.param_digest(runner.model.module),
                params={k: v.detach().clone() for k, v in runner.model.module.state_dict().items()},
                plan=tune.plan.to_dict() if tune is not None else None,
                explained={p.name: p.explained_by for p in tune.report.params if p.explained_by}
                if tune is not None else None)


def example_runs(iters: int) -> Dict[str, Any]:
    """Every rank: plain DDP as written on both variants, and, without the keep-alive terms, the
    hook against find_unused_parameters=True; what the test compares."""
    plain = _train(f'{EXAMPLES}/no_keep_alive.py', iters)
    kept = _train(f'{EXAMPLES}/keep_alive.py', iters)
    reference = _train(f'{EXAMPLES}/no_keep_alive.py', iters, find_unused=True)
    hooked = _train(f'{EXAMPLES}/no_keep_alive.py', iters, hook=dict(probe_iters=4))
    first = reference['params']
    return dict(
        rank=dist.get_rank(), plain_error=plain['error'], kept_error=kept['error'],
        reference_error=reference['error'], hooked_error=hooked['error'],
        losses=len(hooked['losses']), plan=hooked['plan'], digest=hooked['digest'],
        explained=hooked['explained'],
        loss_diff=max(abs(a - b) for a, b in zip(hooked['losses'], reference['losses'])),
        bit_equal=all(torch.equal(hooked['params'][k], first[k]) for k in first),
        # the terms change training: the never-used adapter decays in the kept-alive run
        kept_moved={k: (kept['params'][k] - first[k]).abs().max().item() for k in first})


def tiny_batch(index: int, batch_size: int) -> dict:
    """The failure cases' ``ddp_doctor.synthetic_batch``."""
    g = torch.Generator().manual_seed(index)
    return dict(inputs=torch.randn(batch_size, 4, generator=g))


class _Tiny(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        return dict(loss=self.layer(inputs).square().mean())


class NeedsEmbeddings(_Tiny):
    """Loads text embeddings in ``__init__``, from a file the dry-run machine does not have."""

    def __init__(self, embeddings: str = 'data/text_embeddings.npy') -> None:
        super().__init__()
        self.register_buffer('text', torch.as_tensor(np.load(embeddings)))


class HardCodedCuda(_Tiny):
    """Puts its anchors on 'cuda' in ``__init__``, whatever the machine."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer('anchors', torch.zeros(4, device='cuda'))


class KilledOnRank1(_Tiny):
    """Rank 1 is ended by SIGKILL while it builds the model, as the kernel's OOM killer does."""

    def __init__(self) -> None:
        super().__init__()
        if os.environ.get('RANK') == '1':
            os.kill(os.getpid(), signal.SIGKILL)


class RaisesOnRank1(_Tiny):
    """Rank 1's forward indexes past its batch (as a per-sample data preprocessor does at a batch
    it was not written for); rank 0 then waits in DDP's gradient all-reduce for a peer that is gone."""

    def forward(self, inputs, data_samples=None, mode='tensor'):
        if os.environ.get('RANK') == '1':
            inputs = inputs[inputs.shape[0]]
        return super().forward(inputs, data_samples, mode)


class PerSampleChannels(_Tiny):
    """Written for a per-rank batch of 1: it reads the channel after the sample's own index plus
    two, which exists only at that batch (as a data preprocessor indexing channels per sample)."""

    def forward(self, inputs, data_samples=None, mode='tensor'):
        picked = inputs[:, inputs.shape[0] + 2:]
        return dict(loss=self.layer(inputs).square().mean() + picked[:, 0].mean())


class InitWeightsFails(_Tiny):
    """Its own ``init_weights`` (which the Runner calls in ``train()``, after building the loader)
    raises."""

    def init_weights(self) -> None:
        raise ValueError('init_cfg names no layer of this model')


def missing_module_backend() -> str:
    """A visualizer backend type whose set-up fails as MMEngine's TensorboardVisBackend does without
    tensorboard: an ImportError of MMEngine's words, the ModuleNotFoundError behind it. That one
    itself where tensorboard is missing, else :class:`NeedsMissingModuleVisBackend`."""
    import importlib.util

    return 'TensorboardVisBackend' if importlib.util.find_spec('tensorboard') is None else \
        'NeedsMissingModuleVisBackend'


@VISBACKENDS.register_module()
class NeedsMissingModuleVisBackend(LocalVisBackend):
    """TensorboardVisBackend's set-up, with a module no machine has."""

    def _init_env(self) -> None:
        try:
            import no_such_tensorboard  # noqa: F401
        except ImportError:
            # as MMEngine's: raised inside the except, the ModuleNotFoundError as its __context__
            raise ImportError('Please run "pip install no_such_tensorboard"')  # noqa: B904


def research_repo(tmp_path: Path) -> Tuple[Path, Path]:
    """A research repository (``.git``, a package, a config) whose package registers the model
    its config names, and is not imported by the config; the repository and the config."""
    repo = tmp_path / 'repo'
    (repo / '.git').mkdir(parents=True)
    (repo / 'my_research' / 'models').mkdir(parents=True)
    (repo / 'my_research' / '__init__.py').write_text('')
    (repo / 'my_research' / 'models' / '__init__.py').write_text('')
    (repo / 'my_research' / 'models' / 'adapter_net.py').write_text(textwrap.dedent('''\
        from mmengine.registry import MODELS
        from research_cases import _Tiny


        @MODELS.register_module()
        class AdapterNet(_Tiny):
            """A model this repository's own tools/train.py imports; its configs do not."""
        '''))
    (repo / 'configs' / 'adapter').mkdir(parents=True)
    config = repo / 'configs' / 'adapter' / 'adapter_net.py'
    config.write_text("model = dict(type='AdapterNet')\n")
    return repo, config
