"""Small MMEngine models whose parameter usage breaks plain DDP, and a Runner driver for one rank.

Every model reproduces one user report: a config-disabled distillation module, a branch used on one
rank only, modality dropout, random goal-encoder selection, tied weights + a frozen layer + root-level
parameters, and branches that wake up or fall asleep after the probe.
"""
import fnmatch
import hashlib
import json
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from mmengine.config import Config
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel, MMDistributedDataParallel, convert_sync_batchnorm
from mmengine.registry import METRICS
from mmengine.runner import Runner
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from mmddp_hooks.checkpoint import safe_checkpoint_loading
from mmddp_hooks.compat import resume_restores_data_position
from mmddp_hooks.model_from_config import unformatted

DIM = 8


class RandomVectors(Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, DIM, generator=g)
        self.y = torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return dict(inputs=self.x[i], target=self.y[i], index=i)


class ScenarioModel(BaseModel):
    """Trunk -> head regression; subclasses add the branch that makes usage interesting."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(DIM, DIM), nn.ReLU(), nn.Linear(DIM, DIM))
        self.head = nn.Linear(DIM, 1)
        self.calls = 0
        self.steps = 0  # training forwards (mode='loss'), which val loops do not advance

    def branch(self, h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return h

    def forward(self, inputs, target=None, index=None, mode='loss'):
        h = self.branch(self.trunk(inputs), index)
        out = self.head(h)
        self.calls += 1
        if mode == 'loss':
            self.steps += 1
            return dict(loss=((out - target) ** 2).mean())
        return self.predict(h, out)

    def predict(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out


class AllUsed(ScenarioModel):
    pass


class DisabledDistill(ScenarioModel):
    """``use_resolution_distill=False`` in the config: the module is built but never called."""

    def __init__(self) -> None:
        super().__init__()
        self.resolution_distill = nn.Sequential(nn.Linear(DIM, DIM), nn.Linear(DIM, DIM))


class RankOneBranch(ScenarioModel):
    def __init__(self) -> None:
        super().__init__()
        self.rank1_adapter = nn.Linear(DIM, DIM)

    def branch(self, h, index):
        return self.rank1_adapter(h) if dist.get_rank() == 1 else h


class ModalityDropout(ScenarioModel):
    """Each iteration, each rank drops the depth branch with probability 1/2."""

    def __init__(self) -> None:
        super().__init__()
        self.depth_encoder = nn.Linear(DIM, DIM)

    def branch(self, h, index):
        g = torch.Generator().manual_seed(1000 * self.calls + dist.get_rank())
        return h + self.depth_encoder(h) if torch.rand(1, generator=g).item() < 0.5 else h


class GoalEncoders(ScenarioModel):
    """Each sample picks one of three goal encoders; with batch 2 some go unused each iteration."""

    def __init__(self) -> None:
        super().__init__()
        self.goal_encoders = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(3))

    def branch(self, h, index):
        rows = [self.goal_encoders[int(i) % 3](h[j:j + 1]) for j, i in enumerate(index)]
        return torch.cat(rows)


class TiedFrozenRoot(ScenarioModel):
    """Tied weights, a frozen layer, root-level parameters, and a dead tied module."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(DIM, DIM)
        self.decoder = nn.Linear(DIM, DIM)
        self.decoder.weight = self.encoder.weight          # tied, used
        self.frozen = nn.Linear(DIM, DIM).requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(1))           # root-level, used
        self.unused_scale = nn.Parameter(torch.ones(1))    # root-level, never used
        self.aux = nn.Linear(DIM, DIM)                     # never used, and registered twice:
        self.aux_alias = self.aux                          # DDP must ignore every alias

    def branch(self, h, index):
        return self.decoder(self.frozen(self.encoder(h))) * self.scale


class WakesUpOnRank1(ScenarioModel):
    """The refinement branch is switched on at iteration 6, on rank 1 only."""

    def __init__(self) -> None:
        super().__init__()
        self.refine = nn.Linear(DIM, DIM)

    def branch(self, h, index):
        return self.refine(h) if self.calls >= 6 and dist.get_rank() == 1 else h


class FallsAsleepOnRank0(ScenarioModel):
    """The adapter is used everywhere until iteration 6, then rank 0 stops using it."""

    def __init__(self) -> None:
        super().__init__()
        self.adapter = nn.Linear(DIM, DIM)

    def branch(self, h, index):
        return h if self.calls >= 6 and dist.get_rank() == 0 else self.adapter(h)


# Habits of real models, for the contract tests (tests/test_contract.py). WAKE: the training
# iteration at which usage changes, long after the probe.
WAKE = 30


class CalledButUnused(ScenarioModel):
    """mmseg's ResNet with ``out_indices`` dropping a stage: ``stage4`` runs, its output is dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.stage4 = nn.Sequential(nn.Linear(DIM, DIM), nn.ReLU())

    def branch(self, h, index):
        self.stage4(h)
        return h


class PredictOnlyHead(ScenarioModel):
    """A head used in ``predict`` mode only: the val loop calls it, without gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.refine_head = nn.Linear(DIM, 1)

    def predict(self, h, out):
        return out + self.refine_head(h)


class LateModule(ScenarioModel):
    """Distillation switched on after a warm-up, on every rank."""

    def __init__(self) -> None:
        super().__init__()
        self.distill = nn.Linear(DIM, DIM)

    def branch(self, h, index):
        return h + self.distill(h) if self.steps >= WAKE else h


class LateParam(ScenarioModel):
    """A loose root-level parameter (a learned temperature) used after a warm-up only."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.full((1,), 0.5))

    def branch(self, h, index):
        return h * self.temperature if self.steps >= WAKE else h


class SwitchedOff(ScenarioModel):
    """A warm-up branch switched off on every rank after the warm-up."""

    def __init__(self) -> None:
        super().__init__()
        self.warmup = nn.Linear(DIM, DIM)

    def branch(self, h, index):
        return h + self.warmup(h) if self.steps < WAKE else h


class ReentrantCheckpoint(ScenarioModel):
    """``with_cp=True``: a block under reentrant ``torch.utils.checkpoint``, as OpenMMLab does."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(DIM, DIM), nn.ReLU(), nn.Linear(DIM, DIM))

    def branch(self, h, index):
        return h + torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=True)


class NormedLate(LateModule):
    """LateModule with a BatchNorm in its trunk (a SyncBatchNorm under ``sync_bn='torch'``)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(DIM, DIM), nn.BatchNorm1d(DIM), nn.ReLU(),
                                   nn.Linear(DIM, DIM))


class SwitchedOn(BaseModel):
    """LateModule for ``compile=True``: its forward reads no counter (each new value of an int
    attribute is a recompile, and past torch's recompile limit the forward runs uncompiled);
    :class:`SwitchOn` turns the distillation branch on."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(DIM, DIM), nn.ReLU(), nn.Linear(DIM, DIM))
        self.distill = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, 1)
        self.distill_on = False

    def forward(self, inputs, target=None, index=None, mode='loss'):
        h = self.trunk(inputs)
        out = self.head(h + self.distill(h) if self.distill_on else h)
        return dict(loss=((out - target) ** 2).mean()) if mode == 'loss' else out


class SwitchOn(Hook):
    """Set the model's ``distill_on`` before training iteration ``at`` (0-based), every rank."""

    def __init__(self, at: int) -> None:
        self.at = at

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if runner.iter == self.at:
            module = runner.model.module if hasattr(runner.model, 'module') else runner.model
            module.distill_on = True


MODELS = {cls.__name__: cls for cls in (AllUsed, DisabledDistill, RankOneBranch, ModalityDropout,
                                        GoalEncoders, TiedFrozenRoot, WakesUpOnRank1,
                                        FallsAsleepOnRank0, CalledButUnused, PredictOnlyHead,
                                        LateModule, LateParam, SwitchedOff, ReentrantCheckpoint,
                                        SwitchedOn, NormedLate)}


@METRICS.register_module(force=True)
class ScenarioMSE(BaseMetric):
    """Mean squared error of the val loop's predictions (the val loop only has to run)."""

    def process(self, data_batch, data_samples) -> None:
        for out, target in zip(data_samples, data_batch['target']):
            self.results.append(float(((out - target.to(out.device)) ** 2).mean()))

    def compute_metrics(self, results) -> Dict[str, float]:
        return dict(mse=sum(results) / max(len(results), 1))


class LossRecorder(Hook):
    def __init__(self) -> None:
        self.losses: List[float] = []
        self.vals = 0

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.losses.append(float(outputs['loss'].detach()))

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.vals += 1


def param_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(model_name: str, *, hook: Optional[dict] = None, find_unused: bool = False,
          iters: int = 10, optimizer: Optional[dict] = None, work_dir: Optional[str] = None,
          resume: bool = False, checkpoint_interval: int = 0,
          ema: bool = False, log_level: str = 'WARNING',
          prewrap: bool = False, load_from: Optional[str] = None,
          optim_wrapper: Optional[dict] = None, val_interval: int = 0,
          log_interval: int = 1, frozen: Sequence[str] = (), extra_hooks: Sequence[Any] = (),
          wrapper: Optional[dict] = None, dataset: Optional[Dataset] = None,
          ddp_ignore: Sequence[str] = (), compile: Any = None,
          sync_bn: Optional[str] = None) -> Dict[str, Any]:
    """Train one scenario on this rank through a real Runner; return what the tests compare.

    ``optim_wrapper``: extra optimizer-wrapper keys (type, clip_grad, dtype, paramwise_cfg, ...);
    ``val_interval``: run a val loop every that many iterations; ``frozen``: globs of parameters
    that do not require grad when the model is wrapped; ``extra_hooks``: more custom hooks;
    ``wrapper``: more ``model_wrapper_cfg`` keys; ``dataset``: the training set; ``ddp_ignore``:
    what the user tells DDP to ignore; ``compile``: the config's ``compile`` (MMEngine compiles
    the wrapper's ``train_step`` with it); ``sync_bn``: the config's ``sync_bn`` (a model wrapped
    by hand is converted as MMEngine would, on a GPU only: SyncBatchNorm cannot run on CPU, where
    ReconfigurableDDP reverts it).
    """
    torch.manual_seed(0)
    model = MODELS[model_name]()
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, g) for g in frozen):
            p.requires_grad_(False)
    if ddp_ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(ddp_ignore))
    recorder = LossRecorder()
    work_dir = work_dir or tempfile.mkdtemp(prefix=f'mmddp_{model_name}_')
    hooks: List[Any] = [recorder, *extra_hooks]
    if hook is not None:
        hooks.insert(0, dict(type='DDPAutoTuneHook', **hook))
    if ema:
        hooks.append(dict(type='EMAHook', momentum=0.1))
    default_hooks = dict(logger=dict(type='LoggerHook', interval=log_interval),
                         checkpoint=dict(type='CheckpointHook', interval=checkpoint_interval or 10**6,
                                         by_epoch=False))
    wrapper_cfg = dict(type='ReconfigurableDDP', find_unused_parameters=find_unused, **(wrapper or {}))
    if torch.cuda.is_available():  # the Runner moves the model to the current GPU (shared by ranks)
        wrapper_cfg['device_ids'] = [torch.cuda.current_device()]
    if prewrap:  # the user wrapped the model by hand: the runner leaves it alone (and on its device)
        devices = dict(device_ids=[torch.cuda.current_device()]) if torch.cuda.is_available() else {}
        model = model.cuda() if devices else model
        if sync_bn and devices:
            model = convert_sync_batchnorm(model, sync_bn)
        model = MMDistributedDataParallel(model, find_unused_parameters=find_unused, **devices)
        wrapper_cfg = None
    optim_cfg = dict(optimizer=optimizer or dict(type='SGD', lr=0.05, momentum=0.9),
                     **(optim_wrapper or {}))
    runner = Runner(
        model=model,
        work_dir=work_dir,
        experiment_name=f'{model_name}_{os.getpid()}_{next(_RUN_IDS)}',
        # one epoch covers the run: MMEngine sleeps 2 s each time an iteration loop restarts one
        train_dataloader=dict(dataset=dataset or RandomVectors(max(64, 2 * iters * dist.get_world_size())),
                              batch_size=2, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=True),
                              collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=iters, val_interval=val_interval or iters + 1),
        optim_wrapper=optim_cfg,
        **_val_loop(val_interval),
        # as Runner.from_cfg has; logged and dumped without yapf
        cfg=unformatted(Config(dict(model_wrapper_cfg=wrapper_cfg, optim_wrapper=optim_cfg,
                                    compile=compile, sync_bn=sync_bn))),
        custom_hooks=hooks,
        default_hooks=default_hooks,
        launcher='pytorch',
        env_cfg=dict(dist_cfg=dict(backend='gloo')),
        randomness=dict(seed=0),
        resume=resume,
        load_from=load_from,
        log_level=log_level,
    )
    with safe_checkpoint_loading():  # resume under torch >= 2.6, as tools/train.py does
        runner.train()
    wrapper = runner.model
    tune = next((h for h in runner.hooks if type(h).__name__ == 'DDPAutoTuneHook'), None)
    plan = tune.plan.to_dict() if tune is not None and tune.plan is not None else None
    return dict(
        losses=recorder.losses,
        vals=recorder.vals,
        digest=param_digest(wrapper.module),
        params={k: v.detach().clone() for k, v in wrapper.module.state_dict().items()},
        plan=plan,
        current=dict(find_unused=wrapper.find_unused_parameters,
                     ignored=sorted(getattr(wrapper.module, '_ddp_params_and_buffers_to_ignore',
                                            []))),
        switch_log=list(getattr(wrapper, 'switch_log', [])),
        trainable_log=list(getattr(wrapper, 'trainable_log', [])),
        probed=tune is not None and tune.report_path is not None,
        wrapper_type=type(wrapper).__name__,
        # read here: the run's temporary folders, work_dir among them, go when the run ends
        report=_read_json(tune.report_path) if tune is not None and tune.report_path else None,
        work_dir=work_dir,
        optimized=_optimized(runner.optim_wrapper, wrapper.module),
        layers=sorted({type(m).__name__ for m in wrapper.module.modules()}),
    )


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _optimized(optim_wrapper, module: nn.Module) -> Dict[str, Dict[str, float]]:
    """Each parameter the optimizer holds: its group's lr and weight decay, by name."""
    names = {id(p): n for n, p in module.named_parameters()}
    return {names[id(p)]: dict(lr=g['lr'], weight_decay=g.get('weight_decay', 0.0))
            for g in optim_wrapper.optimizer.param_groups for p in g['params']}


def _val_loop(val_interval: int) -> Dict[str, Any]:
    if not val_interval:
        return {}
    return dict(val_dataloader=dict(dataset=RandomVectors(8), batch_size=2, num_workers=0,
                                    sampler=dict(type='DefaultSampler', shuffle=False),
                                    collate_fn=dict(type='default_collate')),
                val_evaluator=dict(type='ScenarioMSE'), val_cfg=dict())


def _counter():
    i = 0
    while True:
        i += 1
        yield i


_RUN_IDS = _counter()


def compare_runs(tuned: Dict[str, Any], reference: Dict[str, Any]) -> Dict[str, Any]:
    """What the contract tests compare between a tuned run and its reference, on this rank."""
    return dict(
        rank=dist.get_rank(), losses=len(tuned['losses']), vals=tuned['vals'],
        loss_diff=max(abs(a - b) for a, b in zip(tuned['losses'], reference['losses'])),
        param_diff=max((tuned['params'][k] - reference['params'][k]).abs().max().item()
                       for k in tuned['params']),
        bit_equal=all(torch.equal(tuned['params'][k], reference['params'][k])
                      for k in tuned['params']),
        digest=tuned['digest'], plan=tuned['plan'], current=tuned['current'],
        switch_log=tuned['switch_log'], trainable_log=tuned['trainable_log'])


def assert_trains_alike(rows: List[Dict[str, Any]], world_size: int, iters: int,
                        tolerance: float = 1e-6) -> None:
    """Every rank's :func:`compare_runs` row: replicas bit-identical, ``iters`` losses and a val
    every 4, loss curve and final parameters within ``tolerance`` of the reference, bit for bit on
    2 ranks (a+b in any order; on 3, ring sums follow bucket positions, which the plan's ignore set
    and DDP's bucket rebuild move: last-bit differences)."""
    assert len({r['digest'] for r in rows}) == 1, 'replicas diverged'
    for r in rows:
        assert r['losses'] == iters and r['vals'] == iters // 4
        assert r['loss_diff'] <= tolerance and r['param_diff'] <= tolerance, r
        assert r['bit_equal'] or world_size > 2, r


def compare_with_find_unused(model_name: str, hook: dict, iters: int = 10,
                             optimizer: Optional[dict] = None,
                             config_find_unused: bool = False) -> Dict[str, Any]:
    """Train with the hook, then with find_unused_parameters=True and no hook, from the same seeds."""
    tuned = train(model_name, hook=hook, iters=iters, optimizer=optimizer,
                  find_unused=config_find_unused)
    reference = train(model_name, find_unused=True, iters=iters, optimizer=optimizer)
    max_param_diff = max((tuned['params'][k] - reference['params'][k]).abs().max().item()
                         for k in tuned['params'])
    return dict(tuned={k: v for k, v in tuned.items() if k != 'params'},
                reference_losses=reference['losses'], max_param_diff=max_param_diff,
                rank=dist.get_rank())


def train_plain(model_name: str, iters: int = 10, **kw: Any) -> Dict[str, Any]:
    """``train`` without the parameter tensors; with no hook, plain DDP (crashes on most scenarios)."""
    out = train(model_name, iters=iters, **kw)
    return {k: v for k, v in out.items() if k != 'params'}


def resume_keeps_plan(model_name: str, hook: dict) -> Dict[str, Any]:
    """Train 8 iterations with checkpoints, resume to 12, and compare with 12 uninterrupted ones.

    Before mmengine 0.10.3 a resumed ``IterBasedTrainLoop`` restarts its data from the first batch,
    so no resume matches an uninterrupted run there: the reference is then plain DDP's own resume.
    """
    shared = [tempfile.mkdtemp(prefix='mmddp_resume_') if dist.get_rank() == 0 else None,
              tempfile.mkdtemp(prefix='mmddp_resume_plain_') if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(shared)  # checkpoints are written by rank 0 only
    kw = dict(ema=True, optimizer=dict(type='AdamW', lr=1e-2, weight_decay=1e-2))
    first = train(model_name, iters=8, checkpoint_interval=4, work_dir=shared[0], hook=hook, **kw)
    resumed = train(model_name, iters=12, work_dir=shared[0], resume=True, hook=hook, **kw)
    if resume_restores_data_position():
        reference = train(model_name, iters=12, hook=hook, **kw)
        reference['losses'] = reference['losses'][8:]
    else:
        train(model_name, iters=8, checkpoint_interval=4, work_dir=shared[1], find_unused=True, **kw)
        reference = train(model_name, iters=12, work_dir=shared[1], resume=True, find_unused=True,
                          **kw)
    with safe_checkpoint_loading():
        ckpt = torch.load(os.path.join(shared[0], 'iter_8.pth'), map_location='cpu')
    return dict(first_plan=first['plan'], resumed_plan=resumed['plan'],
                resumed_probed=resumed['probed'], resumed_losses=resumed['losses'],
                straight_losses=reference['losses'], checkpoint_plan=ckpt['mmddp_hooks']['plan'],
                resumed_digest=resumed['digest'], straight_digest=reference['digest'],
                ema_saved='ema_state_dict' in ckpt)


def _threads() -> int:
    """Threads of this process (torch 2.1 leaves its gloo workers unnamed, so count them all)."""
    return len(os.listdir('/proc/self/task'))


def gloo_threads_around_teardown() -> Dict[str, int]:
    """Train through a Runner, drop it, teardown: the group's threads must be gone afterwards."""
    from mmddp_hooks.dist import teardown

    train_plain('DisabledDistill', iters=6, hook=dict(probe_iters=2))
    during = _threads()  # the finished Runner (a reference cycle) still holds the process group
    teardown()
    return dict(during=during, after=_threads())
