# A research-style new-style config whose model changes what trains after the Runner wrapped it in
# DDP (projects/late_freeze): here the backbone freezes itself in train(), which the train loop
# calls before the first iteration. find_unused_parameters is not set: plain DDP runs False.
from mmengine.optim import OptimWrapper
from mmengine.runner import IterBasedTrainLoop
from torch.optim import SGD

from projects.late_freeze import LateFreezeNet

model = dict(type=LateFreezeNet, width=8, freeze_in_train=True)
train_dataloader = dict(batch_size=4, num_workers=0, dataset=dict(type='data/not/here'),
                        sampler=dict(type='DefaultSampler', shuffle=True))
train_cfg = dict(type=IterBasedTrainLoop, max_iters=1000)
optim_wrapper = dict(type=OptimWrapper,
                     optimizer=dict(type=SGD, lr=0.01, momentum=0.9, weight_decay=1e-4))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
# the data is not on this machine: the DDP doctor builds batches with this function instead
ddp_doctor = dict(synthetic_batch='projects.late_freeze.make_batch')
