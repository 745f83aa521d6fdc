# A RapSAM-like segmentor with three config toggles. Each branch is built whatever its toggle says;
# ddp_branches tells mmddp_hooks which modules each toggle owns, so switched-off branches are frozen
# before DDP and never need find_unused_parameters=True.
custom_imports = dict(imports=['mmddp_hooks', 'projects.rapsam_like'], allow_failed_imports=False)

model = dict(
    type='RapSAMLikeSegmentor',
    channels=8,
    decode_head=dict(use_learnable_fusion=True, num_classes=4),
    use_resolution_distill=True,
    use_sam_distill=True,
    use_point_prompt=False)

ddp_branches = dict(
    learnable_fusion=dict(flag='model.decode_head.use_learnable_fusion',
                          params=['decode_head.fusion_weights.*']),
    resolution_distill=dict(flag='model.use_resolution_distill', modules=['resolution_distill']),
    sam_distill=dict(flag='model.use_sam_distill', modules=['sam_distill']),
    point_prompt=dict(flag='model.use_point_prompt', modules=['point_encoder']))

train_dataloader = dict(
    batch_size=2, num_workers=0,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='RandomSegPairs', length=32, size=16, num_classes=4))
train_cfg = dict(type='IterBasedTrainLoop', max_iters=6)
optim_wrapper = dict(optimizer=dict(type='AdamW', lr=1e-3, weight_decay=1e-2))
model_wrapper_cfg = dict(type='ReconfigurableDDP', find_unused_parameters=False)
custom_hooks = [dict(type='DDPAutoTuneHook', probe_iters=2), dict(type='ReplicaConsistencyHook')]
default_hooks = dict(logger=dict(type='LoggerHook', interval=1, log_metric_by_epoch=False),
                     checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1000))
log_processor = dict(by_epoch=False)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
