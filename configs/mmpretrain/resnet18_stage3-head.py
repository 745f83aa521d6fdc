# ResNet-18 ImageNet classifier (real mmpretrain 1.2.0 config) whose head reads stage 3
# (out_indices=(2,)), as a lighter head or a feature-level experiment does. mmpretrain's ResNet still
# runs every stage and keeps only out_indices, so backbone.layer4 runs but never reaches the loss:
# plain DDP with find_unused_parameters=False crashes at iteration 2.
_base_ = ['mmpretrain::resnet/resnet18_8xb32_in1k.py', './_ddp_cpu_.py']
model = dict(backbone=dict(out_indices=(2, )), head=dict(in_channels=256))
train_dataloader = dict(batch_size=2)
randomness = dict(seed=0, deterministic=False)  # runs compare bit for bit
