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


# ------------------------------------------------------------- zero-weighted terms, batch kinds
KINDS = [['det', 'sam', 'det', 'sam'], ['sam', 'det', 'sam', 'det']]  # per rank, per iteration


def _two_kinds(keep_alive: bool) -> Usage:
    """trunk always; det_head in 'det' batches, sam_head in 'sam' ones; caption never. With the
    keep-alive terms every parameter arrives, the idle ones with an exactly-zero gradient."""
    names = ['trunk.w', 'det_head.w', 'sam_head.w', 'caption.w']
    real = np.zeros((2, 4, 4), bool)
    real[:, :, 0] = True
    for r, kinds in enumerate(KINDS):
        for i, kind in enumerate(kinds):
            real[r, i, 1 if kind == 'det' else 2] = True
    batch = [[{'data_tag': (k,)} for k in kinds] for kinds in KINDS]
    if not keep_alive:
        return Usage(names, [1] * 4, real, batch=batch)
    return Usage(names, [1] * 4, np.ones_like(real), zero=~real, zero_weighted=np.ones_like(real),
                 zero_terms={n: ['model.py:9: loss = loss + 0.0 * idle'] for n in names},
                 batch=batch)


def test_usage_without_keep_alive_terms_is_explained_by_the_batch_kind():
    report = build_report(_two_kinds(keep_alive=False))
    by_name = {p.name: p for p in report.params}
    assert by_name['det_head.w'].kind == DYNAMIC and by_name['caption.w'].kind == NEVER
    assert by_name['det_head.w'].explained_by == "data_tag='det'"
    assert by_name['sam_head.w'].explained_by == "data_tag='sam'"
    assert by_name['trunk.w'].explained_by is None and by_name['caption.w'].explained_by is None
    assert (by_name['det_head.w'].observed, by_name['det_head.w'].used_count) == (8, 4)
    assert report.batch_kinds == {'data_tag': {'det': 4, 'sam': 4}}
    table = report.table()
    assert "dynamic (used in 50% of rank-iterations, only in batches with data_tag='det')" in table
    assert "batch kinds seen (rank-iterations): data_tag: 'det' 4, 'sam' 4" in table
    assert 'never used means no gradient in any of 8 rank-iterations' in table  # a small sample
    assert not report.kept_alive and report.without_keepalive is None


def test_keep_alive_terms_are_named_and_the_plan_says_what_they_change():
    report = build_report(_two_kinds(keep_alive=True))
    assert report.counts == {ALWAYS: 4, NEVER: 0, RANK_FIXED: 0, DYNAMIC: 0}
    assert [(p.name, p.kept_alive) for p in report.kept_alive] == [
        ('det_head.w', 4), ('sam_head.w', 4), ('caption.w', 8)]
    real = report.without_keepalive
    assert real.names_of(NEVER) == ['caption.w'] and real.names_of(DYNAMIC) == ['det_head.w',
                                                                               'sam_head.w']
    table = report.table()
    assert 'kept alive by zero-weighted terms: 3 params' in table
    assert '  caption        1        1         8 of 8  model.py:9: loss = loss + 0.0 * idle' in table
    assert "only in batches with data_tag='sam'" in table  # the usage without the terms
    plan = choose_plan(report, zero_grad_effect='SGD (momentum 0.9) moves a parameter')
    assert not plan.find_unused_parameters  # DDP sees every parameter used: the config runs
    assert plan.reasons[-1].startswith('3 parameters were kept alive by zero-weighted terms '
                                       '(model.py:9: loss = loss + 0.0 * idle) in up to 8 of 8')
    assert 'SGD (momentum 0.9) moves a parameter. Delete the terms: DDPAutoTuneHook then plans ' \
           'the real usage (1 always used, 1 never used, 0 used on some ranks only, 2 dynamic): ' \
           'find_unused_parameters=True' in plan.reasons[-1]
    kept = choose_plan(report, policy='keep')
    assert 'kept alive by zero-weighted terms' in kept.reasons[-1]


def test_keep_alive_terms_of_installed_libraries_are_one_line_and_no_advice():
    """mmdet's RoI extractor multiplies every parameter by 0 for a batch without boxes, on
    purpose: named, but not the user's to delete, and not a plan of its own."""
    usage = _two_kinds(keep_alive=True)
    where = '.venv/lib/python3.11/site-packages/mmdet/models/roi_extractor.py:118: x * 0.'
    usage.zero_terms = {n: [where] for n in usage.names}
    report = build_report(usage)
    assert not report.kept_alive and report.without_keepalive is None
    assert [p.name for p in report.kept_alive_by_libraries] == ['det_head.w', 'sam_head.w',
                                                              'caption.w']
    assert ('kept alive by zero-weighted terms of installed libraries: 3 params in up to 8 of 8 '
            'rank-iterations (mmdet/models/roi_extractor.py:118)') in report.table()
    assert not any('zero-weighted' in r for r in choose_plan(report).reasons)


def test_an_exactly_zero_gradient_without_a_zero_weighted_term_counts_as_used():
    usage = _two_kinds(keep_alive=True)
    usage.zero_weighted[:] = False  # e.g. a ReLU that was dead for that batch
    report = build_report(usage)
    assert not report.kept_alive and report.without_keepalive is None


def test_what_an_optimizer_does_with_a_zero_gradient():
    import torch

    from mmddp_hooks.plan import zero_grad_effect

    p = [torch.nn.Parameter(torch.ones(1))]
    assert 'does not move' in zero_grad_effect(torch.optim.SGD(p, lr=0.1))
    assert zero_grad_effect(torch.optim.SGD(p, lr=0.1, momentum=0.9)).startswith(
        'SGD (momentum 0.9) moves a parameter whose gradient is zero')
    assert zero_grad_effect(torch.optim.AdamW(p, weight_decay=0.05)).startswith(
        'AdamW (its running averages, weight decay 0.05) moves')


def test_batch_attributes_come_from_the_samples_metainfo_and_dicts():
    from mmengine.structures import BaseDataElement

    from mmddp_hooks.batch_kinds import batch_attributes

    samples = [BaseDataElement(metainfo=dict(data_tag='sam', img_path='a.jpg')),
               BaseDataElement(metainfo=dict(data_tag='det'))]
    assert batch_attributes(dict(inputs=None, data_samples=samples)) == {'data_tag': ('det', 'sam')}
    assert batch_attributes([dict(task='seg'), dict(task='seg')]) == {'task': ('seg',)}
    assert batch_attributes(dict(inputs=None, dataset=['coco', 'sa1b'])) == {
        'dataset': ('coco', 'sa1b')}


def test_the_probe_goes_on_while_a_batch_kind_is_rarely_seen():
    from mmddp_hooks.batch_kinds import explain, probe_more

    one = [[{'data_tag': ('sam',)}] * 4, [{'data_tag': ('sam',)}] * 3 + [{'data_tag': ('det',)}]]
    assert probe_more(one, 4, min_seen=3, max_iters=32) == (8, (
        "batch kinds vary and some were seen in fewer than 3 rank-iterations (data_tag='det' in "
        '1): probing on to 8 iterations (at most 32)'))
    assert probe_more(one, 32, 3, 32) == (32, None)  # the bound
    assert probe_more([[{'data_tag': ('sam',)}] * 4] * 2, 4, 3, 32) == (4, None)  # one kind only
    ids = [[{'data_tag': (str(i),)} for i in range(20)]]  # an identifier, not a kind
    assert probe_more(ids, 20, 3, 32) == (20, None)
    # a mixed batch holds both kinds: used exactly where the batch holds 'det'
    mixed = [[{'data_tag': ('det', 'sam')}, {'data_tag': ('sam',)}, {'data_tag': ('det',)}]]
    used = np.array([[[True, True], [False, True], [True, False]]])
    assert explain(used, mixed) == ["data_tag='det'", "data_tag='sam'"]
    used[0, 1, 1] = False  # no set of values decides it now
    assert explain(used, mixed) == ["data_tag='det'", None]
