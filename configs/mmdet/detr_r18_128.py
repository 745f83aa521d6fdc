# DETR (real mmdet 3.3.0 config) cut down for CPU dry runs: ResNet-18 (its last stage feeds the
# transformer), no pretrained download.
_base_ = ['mmdet::detr/detr_r50_8xb2-150e_coco.py']
custom_imports = dict(imports=['mmddp_hooks'], allow_failed_imports=False)
model = dict(backbone=dict(depth=18, init_cfg=None), neck=dict(in_channels=[512]))
randomness = dict(seed=0)
model_wrapper_cfg = dict(type='ReconfigurableDDP', find_unused_parameters=False)
custom_hooks = [dict(type='DDPAutoTuneHook', probe_iters=2), dict(type='ReplicaConsistencyHook')]
