"""Pure decision logic: usage -> classes -> groups -> plan. No processes."""
import numpy as np
import pytest

from mmddp_hooks.plan import DDPPlan, choose_plan, crash_reason
from mmddp_hooks.report import (
    ALWAYS,
    DYNAMIC,
    NEVER,
    RANK_FIXED,
    Usage,
    build_report,
    classify,
    group_by_module,
)

NAMES = ['trunk.weight', 'distill.a.weight', 'distill.b.weight', 'adapter.weight', 'drop.weight']


def _usage(ranks=2, iters=4):
    used = np.ones((ranks, iters, len(NAMES)), bool)
    used[:, :, 1:3] = False            # distill.*: never
    used[0, :, 3] = False              # adapter: rank 1 only, every iteration
    used[1, ::2, 4] = False            # drop: some iterations on rank 1
    return Usage(names=NAMES, numels=[4, 6, 6, 3, 2], used=used)


def test_classify_each_kind():
    kinds = {p.name: (p.kind, p.ranks_used) for p in classify(_usage())}
    assert kinds == {'trunk.weight': (ALWAYS, [0, 1]), 'distill.a.weight': (NEVER, []),
                     'distill.b.weight': (NEVER, []), 'adapter.weight': (RANK_FIXED, [1]),
                     'drop.weight': (DYNAMIC, [0, 1])}
    assert [p.frequency for p in classify(_usage())][4] == pytest.approx(0.75)


def test_groups_collapse_to_shortest_uniform_prefix():
    groups = {g.prefix: g for g in group_by_module(classify(_usage()))}
    assert groups['distill'].describe() == 'distill: 2 params, 12 elems, never used'
    assert groups['adapter'].describe() == 'adapter: 1 param, 3 elems, used on some ranks only ' \
                                           '(used on rank 1)'
    assert groups['drop'].describe() == 'drop: 1 param, 2 elems, dynamic (used in 75% of ' \
                                        'rank-iterations)'


def test_mixed_module_keeps_parameter_names():
    used = np.ones((1, 2, 2), bool)
    used[:, :, 1] = False
    groups = group_by_module(classify(Usage(['m.weight', 'm.bias'], [1, 1], used)))
    assert [(g.prefix, g.kind) for g in groups] == [('m.weight', ALWAYS), ('m.bias', NEVER)]


def test_table_lists_only_unused_groups():
    table = build_report(_usage()).table()
    assert table.splitlines()[0] == ('parameter usage over 4 iterations on 2 ranks: 1 always used, '
                                     '2 never used, 1 used on some ranks only, 1 dynamic')
    assert 'trunk' not in table and 'distill' in table and '12' in table


def test_bad_usage_shape_is_rejected():
    with pytest.raises(ValueError, match='does not match 2 parameter names'):
        Usage(['a', 'b'], [1, 1], np.ones((1, 1, 3), bool))


def _report(used_cols):
    used = np.ones((2, 4, len(NAMES)), bool)
    for col, pattern in used_cols.items():
        used[:, :, col] = pattern
    return build_report(Usage(NAMES, [1] * len(NAMES), used))


def test_plan_nothing_unused_turns_find_unused_off():
    plan = choose_plan(_report({}), asked_find_unused=True)
    assert not plan.find_unused_parameters and not plan.ignore and not plan.fill
    assert plan.reasons[:2] == [
        'the config asked find_unused_parameters=True',
        'find_unused_parameters=True was not needed: no unused parameter in 4 iterations on '
        '2 ranks']
    assert plan.guarded


def test_plan_never_used_is_ignored_never_frozen():
    """A call proves nothing (mmseg's ResNet runs stages it drops): only gradients wake a
    parameter, so never-used parameters stay trainable and DDP-ignored, whole modules too."""
    plan = choose_plan(_report({1: False, 2: False, 0: False}))
    assert plan.ignore == ['trunk.weight', 'distill.a.weight', 'distill.b.weight']
    assert not plan.find_unused_parameters and plan.guarded and not plan.reentrant_checkpoint


def test_plan_under_reentrant_checkpointing_never_asks_for_find_unused():
    used = _usage().used
    used[:, :, 1:4] = True
    report = build_report(Usage(NAMES, [1] * 5, used, reentrant_checkpoint=True))
    plan = choose_plan(report, grad_accumulation=True)
    assert not plan.find_unused_parameters and plan.reentrant_checkpoint
    assert any('marked as ready twice' in r for r in plan.reasons)
    assert any('the guard completes each such iteration' in r for r in plan.reasons)


def test_saved_plans_of_the_previous_release_load_with_frozen_as_ignored():
    old = dict(find_unused_parameters=False, static_graph=False, ignore=['a'], freeze=['b.w'],
               fill={}, reasons=[], watch_modules=['b'])
    assert DDPPlan.from_dict(old) == DDPPlan(False, ignore=['a', 'b.w'])


def test_plan_rank_fixed_is_filled_per_rank():
    used = np.ones((3, 4, len(NAMES)), bool)
    used[[0, 2], :, 3] = False
    plan = choose_plan(build_report(Usage(NAMES, [1] * 5, used)))
    assert not plan.find_unused_parameters
    assert plan.fill == {0: ['adapter.weight'], 2: ['adapter.weight']}


def test_plan_dynamic_needs_find_unused():
    used = _usage().used
    used[:, :, 1:4] = True
    plan = choose_plan(build_report(Usage(NAMES, [1] * 5, used)))
    assert plan.find_unused_parameters and not plan.guarded
    assert 'drop.weight' in plan.reasons[1]


def test_plan_with_grad_accumulation_does_not_fill():
    plan = choose_plan(_usage_report_fixed(), grad_accumulation=True)
    assert plan.find_unused_parameters and 'accumulated' in plan.reasons[1]


def _usage_report_fixed():
    used = np.ones((2, 4, len(NAMES)), bool)
    used[0, :, 3] = False
    return build_report(Usage(NAMES, [1] * 5, used))


def test_keep_policy_keeps_config_and_warns_about_crash():
    plan = choose_plan(_usage_report_fixed(), asked_find_unused=False, policy='keep')
    assert not plan.find_unused_parameters and not plan.fill
    assert any('would choose' in r for r in plan.reasons)
    assert any('crashes under DDP' in r and 'adapter.weight' in r for r in plan.reasons)


def test_invalid_options_are_named():
    with pytest.raises(ValueError, match="policy must be one of .* got 'fast'"):
        choose_plan(_report({}), policy='fast')


def test_plan_round_trips_through_checkpoint_dict():
    plan = DDPPlan(False, ignore=['a'], fill={1: ['b']}, reasons=['x'])
    assert DDPPlan.from_dict(plan.to_dict()) == plan
    assert plan.to_dict()['fill'] == {'1': ['b']}


def test_crash_reason_is_plain_ddp_on_the_measured_usage():
    """The doctor's verdict and the keep plan's warning come from this one rule."""
    fixed = _usage_report_fixed()
    clean = build_report(Usage(NAMES, [1] * 5, np.ones((2, 4, len(NAMES)), bool)))
    reentrant = build_report(Usage(NAMES, [1] * 5, np.ones((2, 4, len(NAMES)), bool),
                                   reentrant_checkpoint=True))
    assert crash_reason(fixed, find_unused=False, static_graph=False) == \
        'find_unused_parameters=False with unused parameters'
    assert crash_reason(fixed, find_unused=True, static_graph=False) is None
    assert crash_reason(fixed, find_unused=False, static_graph=True) is None
    assert crash_reason(clean, find_unused=False, static_graph=False) is None
    assert 'marked as ready twice' in crash_reason(reentrant, find_unused=True, static_graph=False)
    assert crash_reason(reentrant, find_unused=False, static_graph=False) is None
    kept = choose_plan(reentrant, asked_find_unused=True, policy='keep')
    assert any('crashes under DDP' in r and 'ready twice' in r for r in kept.reasons)
