# Fine-tuning schedule on a real mmseg 1.2.2 FCN ResNet-18: the backbone starts with frozen_stages=2
# (stem, layer1 and layer2 frozen, their BatchNorms in eval mode), a paramwise_cfg gives the backbone a
# tenth of the learning rate (so MMEngine's constructor skips the frozen stages when it builds the
# optimizer), and TrainableScheduleHook lifts the freeze in two steps. ReconfigurableDDP follows each
# change on every rank; ReplicaConsistencyHook proves the replicas stay bit-identical.
_base_ = ['./fcn_r18_stage4-unused.py']
model = dict(backbone=dict(frozen_stages=2))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.1)}))
custom_hooks = [
    dict(type='DDPAutoTuneHook', probe_iters=3),
    dict(type='TrainableScheduleHook', schedule=[
        dict(at=5, unfreeze=['backbone.layer2.*']),
        dict(at=7, unfreeze=['backbone.stem.*', 'backbone.layer1.*'])]),
    dict(type='ReplicaConsistencyHook'),
]
