# BYOL (real mmpretrain 1.2.0 config, ResNet-18 instead of 50): an online network trained through a
# predictor, and a momentum (EMA) target network that never takes gradients (requires_grad=False),
# fed two augmented views of each image through MultiView. Every trainable parameter is used:
# find_unused_parameters=False is right, and the doctor says so.
_base_ = ['mmpretrain::byol/byol_resnet50_16xb256-coslr-200e_in1k.py', './_ddp_cpu_.py']
model = dict(
    backbone=dict(depth=18),
    neck=dict(in_channels=512, hid_channels=512),
    head=dict(predictor=dict(hid_channels=512)))
# mmengine 0.10.7 adds `_scope_='mmpretrain'` to every dict of a `mmpretrain::` base and passes it on
# to the collate function (TypeError: default_collate() got an unexpected keyword argument '_scope_'):
# the collate_fn is declared here again.
train_dataloader = dict(batch_size=2, collate_fn=dict(_delete_=True, type='default_collate'))
randomness = dict(seed=0, deterministic=False)  # runs compare bit for bit
