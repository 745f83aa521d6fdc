# configs/mmseg/fcn_r18_stage4-unused.py, with each rank recording who it is (tests/configs/rank_record.py)
_base_ = ['../../configs/mmseg/fcn_r18_stage4-unused.py']
custom_imports = dict(imports=['mmddp_hooks', 'rank_record'], allow_failed_imports=False)
custom_hooks = [
    dict(type='DDPAutoTuneHook', probe_iters=3),
    dict(type='ReplicaConsistencyHook'),
    dict(type='RankRecordHook'),
]
