# SegFormer MiT-b0 (real mmseg 1.2.2 config): every parameter is used, yet the config keeps
# find_unused_parameters=True "just in case"; the hook measures and switches it off.
_base_ = ['mmseg::segformer/segformer_mit-b0_8xb1-160k_cityscapes-1024x1024.py']
custom_imports = dict(imports=['mmddp_hooks'], allow_failed_imports=False)
model = dict(backbone=dict(init_cfg=None))  # no download in a dry run
find_unused_parameters = True
custom_hooks = [
    dict(type='DDPAutoTuneHook', probe_iters=3),
    dict(type='ReplicaConsistencyHook'),  # proves the replicas stay bit-identical
]
