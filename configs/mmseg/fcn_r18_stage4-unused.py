# FCN ResNet-18 (real mmseg 1.2.2 config) whose backbone out_indices leave the last stage unused:
# ResNet still runs layer4, nobody reads its output, so its parameters never get a gradient.
_base_ = ['mmseg::fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024.py']
custom_imports = dict(imports=['mmddp_hooks'], allow_failed_imports=False)
model = dict(
    pretrained=None,
    backbone=dict(out_indices=(0, 1, 2)),
    decode_head=dict(in_index=2, in_channels=256, channels=64),
    auxiliary_head=dict(in_index=1, in_channels=128, channels=32))
model_wrapper_cfg = dict(type='ReconfigurableDDP', find_unused_parameters=False)
custom_hooks = [
    dict(type='DDPAutoTuneHook', probe_iters=3),
    dict(type='ReplicaConsistencyHook'),  # proves the replicas stay bit-identical
]
