"""Zero-loss steps are not keep-alive terms: a rank-iteration whose every gradient is exactly zero
(a batch with no targets left, a loss of zero-weighted terms only) is counted on its own and left
out of the keep-alive inference. A toy trained step by step, its records made as the probe makes
them (which gradients arrived, which were exactly zero, which a zero-weighted term reached), is
checked against a truth computed per step without the terms. No processes."""
import numpy as np
import torch
from torch import nn

from mmddp_hooks.plan import choose_plan
from mmddp_hooks.probe import zero_weighted_reach
from mmddp_hooks.report import ALWAYS, DYNAMIC, NEVER, RANK_FIXED, Usage, build_report

# per rank, per step: the batch's kind; 'empty' has no targets left after the pipeline's filters
KINDS = [['det', 'empty', 'sam', 'det', 'sam', 'empty'],
         ['sam', 'det', 'empty', 'sam', 'det', 'det']]


class Toy(nn.Module):
    """A trunk, a head per batch kind, an adapter nothing uses; ``keep_alive`` adds every idle
    parameter times 0 to the loss. A batch without targets gives, as mmdet's losses do, the
    outputs times 0: a loss with no signal that still reaches every parameter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 4)
        self.det_head = nn.Linear(4, 2)
        self.sam_head = nn.Linear(4, 2)
        self.adapter = nn.Linear(4, 4)

    def loss(self, x: torch.Tensor, kind: str, keep_alive: bool) -> torch.Tensor:
        feats = self.trunk(x)
        if kind == 'empty':
            return self.det_head(feats).sum() * 0 + self.sam_head(feats).sum() * 0
        head = self.det_head if kind == 'det' else self.sam_head
        loss = head(feats).pow(2).mean()
        if keep_alive:
            idle = [self.adapter, self.sam_head if kind == 'det' else self.det_head]
            loss = loss + sum(p.sum() for m in idle for p in m.parameters()) * 0
        return loss


def _step(model: Toy, kind: str, keep_alive: bool, seed: int):
    """One backward: (got a gradient, gradient exactly zero, reached by a zero-weighted term)."""
    model.zero_grad(set_to_none=True)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))
    loss = model.loss(x, kind, keep_alive)
    reach = zero_weighted_reach(loss, {})
    loss.backward()
    params = list(model.parameters())
    used = np.array([p.grad is not None for p in params])
    zero = np.array([p.grad is not None and not p.grad.ne(0).any() for p in params])
    return used, zero, np.array([id(p) in reach for p in params])


def _records(keep_alive: bool):
    model = Toy()
    steps = [[_step(model, kind, keep_alive, 10 * r + i) for i, kind in enumerate(kinds)]
             for r, kinds in enumerate(KINDS)]
    names = [n for n, _ in model.named_parameters()]
    arrays = [np.array([[s[k] for s in rank] for rank in steps]) for k in range(3)]
    return names, [p.numel() for p in model.parameters()], arrays


def _truth():
    """Per step, without the terms: which parameters got a gradient, over the steps with a
    target (a step without one has no signal to tell usage by); each parameter's kind."""
    names, _, (used, _, _) = _records(keep_alive=False)
    real = np.array([[k != 'empty' for k in kinds] for kinds in KINDS])
    counted = used[real]
    return {n: ALWAYS if counted[:, i].all() else NEVER if not counted[:, i].any() else DYNAMIC
            for i, n in enumerate(names)}


def _usage():
    names, numels, (used, zero, weighted) = _records(keep_alive=True)
    return Usage(names, numels, used, zero=zero, zero_weighted=weighted,
                 zero_terms={n: ['toy.py:40: loss + idle * 0'] for n in names})


def test_steps_without_signal_are_counted_and_left_out_of_the_keep_alive_inference():
    usage = _usage()
    empty = np.array([[k == 'empty' for k in kinds] for kinds in KINDS])
    assert (usage.no_signal == empty).all()  # every gradient exactly zero there, and only there
    assert usage.zero_weighted[empty].any(axis=0).sum() == 6  # the terms reached the trunk too
    report = build_report(usage)
    truth = _truth()
    assert truth == {'trunk.weight': ALWAYS, 'trunk.bias': ALWAYS, 'det_head.weight': DYNAMIC,
                     'det_head.bias': DYNAMIC, 'sam_head.weight': DYNAMIC,
                     'sam_head.bias': DYNAMIC, 'adapter.weight': NEVER, 'adapter.bias': NEVER}
    kept = {p.name: p.kept_alive for p in report.kept_alive}
    assert 'trunk.weight' not in kept and 'trunk.bias' not in kept  # not kept alive: no signal
    assert set(kept) == {n for n, k in truth.items() if k != ALWAYS}
    assert kept['adapter.weight'] == (~empty).sum() == 9  # every step with a signal
    real = report.without_keepalive
    assert {p.name: p.kind for p in real.params} == truth
    assert real.left_out == report.no_signal == 3 and real.cells == 9
    # what DDP sees, terms and empty steps included: the adapter is not in an empty step's graph
    assert report.counts == {ALWAYS: 6, NEVER: 0, RANK_FIXED: 0, DYNAMIC: 2}


def test_without_the_left_out_steps_the_trunk_would_have_been_called_kept_alive():
    """The bug this replaces: every parameter of an empty step counted as kept alive."""
    usage = _usage()
    old_kept = usage.used & usage.zero & usage.zero_weighted
    assert old_kept[:, :, :2].any()  # the trunk, in the empty steps
    assert not usage.kept_alive[:, :, :2].any()


def test_the_report_and_the_plan_say_so():
    report = build_report(_usage())
    table = report.table()
    assert ('in 3 rank-iterations the loss had no signal: empty targets? every gradient that '
            'arrived was exactly zero') in table
    assert 'kept alive by zero-weighted terms: 6 params' in table
    assert '9 of 9' in table  # the adapter: every rank-iteration with a signal
    assert report.to_dict()['no_signal'] == 3
    reason = choose_plan(report).reasons[-1]
    assert reason.startswith('6 parameters were kept alive by zero-weighted terms '
                             '(toy.py:40: loss + idle * 0) in up to 9 of 9 rank-iterations')
    assert ('plans the real usage (2 always used, 2 never used, 0 used on some ranks only, '
            '4 dynamic)') in reason


def test_a_step_with_a_signal_is_not_left_out():
    """A real loss whose gradients happen to be zero for some parameters is a signal."""
    usage = _usage()
    usage.zero[:] = False
    assert not usage.no_signal.any() and build_report(usage).no_signal == 0
    assert 'no signal' not in build_report(usage).table()
