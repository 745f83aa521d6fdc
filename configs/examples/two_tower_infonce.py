# A two-tower retriever whose InfoNCE sees the global batch: 2 ranks x batch 3 trains like 1 x 6.
# Run on 2 CPU ranks from the repository root (projects/ on PYTHONPATH):
# PYTHONPATH=. torchrun --standalone --nproc_per_node 2 <your train script> this config
custom_imports = dict(imports=['mmddp_hooks', 'projects.two_tower'], allow_failed_imports=False)

model = dict(
    type='TwoTowerRetriever',
    in_dim=16,
    embed_dim=8,
    loss=dict(type='GlobalInBatchInfoNCE', temperature=0.2, learnable_temperature=True,
              symmetric=True, negatives='global'))

train_dataloader = dict(
    batch_size=3,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='PairedViewsDataset', length=512, dim=16))

train_cfg = dict(by_epoch=False, max_iters=60)
optim_wrapper = dict(optimizer=dict(type='Adam', lr=0.01))
model_wrapper_cfg = dict(type='ReconfigurableDDP')
custom_hooks = [dict(type='DDPAutoTuneHook', probe_iters=2)]
default_hooks = dict(logger=dict(type='LoggerHook', interval=10),
                     checkpoint=dict(type='CheckpointHook', interval=1000, by_epoch=False))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
launcher = 'pytorch'
work_dir = './work_dirs/two_tower_infonce'
