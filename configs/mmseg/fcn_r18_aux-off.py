# FCN ResNet-18 with its auxiliary head built but switched off by a config flag.
_base_ = ['mmseg::fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024.py']
custom_imports = dict(imports=['mmddp_hooks', 'projects.toggle_aux'], allow_failed_imports=False)
model = dict(
    type='ToggleAuxEncoderDecoder',
    use_auxiliary_head=False,
    pretrained=None,
    decode_head=dict(channels=64),
    auxiliary_head=dict(channels=32))
model_wrapper_cfg = dict(type='ReconfigurableDDP', find_unused_parameters=False)
custom_hooks = [
    dict(type='DDPAutoTuneHook', probe_iters=3),
    dict(type='ReplicaConsistencyHook'),  # proves the replicas stay bit-identical
]
