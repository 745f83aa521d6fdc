# Mask R-CNN (real mmdet 3.3.0 config) cut down for CPU dry runs: ResNet-18, no pretrained download.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py']
custom_imports = dict(imports=['mmddp_hooks'], allow_failed_imports=False)
model = dict(backbone=dict(depth=18, init_cfg=None), neck=dict(in_channels=[64, 128, 256, 512]))
randomness = dict(seed=0)
model_wrapper_cfg = dict(type='ReconfigurableDDP', find_unused_parameters=False)
custom_hooks = [dict(type='DDPAutoTuneHook', probe_iters=2), dict(type='ReplicaConsistencyHook')]
