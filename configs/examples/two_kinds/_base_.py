# A research-style new-style (lazy) config: its imports run when the objects are built, from the
# repository root on PYTHONPATH (tools/dist_train.sh sets it; the DDP doctor adds the current
# folder). One model, two batch kinds, each training its own branch (projects/two_kinds).
from mmcv.transforms import LoadImageFromFile
from mmengine.dataset import DefaultSampler, pseudo_collate
from mmengine.hooks import CheckpointHook, LoggerHook
from mmengine.model import ImgDataPreprocessor
from mmengine.optim import OptimWrapper
from mmengine.runner import IterBasedTrainLoop
from torch.optim import AdamW

from projects.two_kinds import LoadPrompts, PackPromptInputs, PromptedImages, TwoKindModel

model = dict(type=TwoKindModel, channels=8, keep_alive=False,
             data_preprocessor=dict(type=ImgDataPreprocessor))
train_dataloader = dict(
    batch_size=16, num_workers=2, persistent_workers=True,
    sampler=dict(type=DefaultSampler, shuffle=True),
    collate_fn=dict(type=pseudo_collate),
    dataset=dict(type=PromptedImages, data_root='data/prompted', ann_file='ann.json',
                 data_prefix=dict(img_path=''),
                 pipeline=[dict(type=LoadImageFromFile), dict(type=LoadPrompts),
                           dict(type=PackPromptInputs)]))
train_cfg = dict(type=IterBasedTrainLoop, max_iters=2000)
optim_wrapper = dict(type=OptimWrapper, optimizer=dict(type=AdamW, lr=1e-3, weight_decay=0.05))
default_hooks = dict(logger=dict(type=LoggerHook, interval=50),
                     checkpoint=dict(type=CheckpointHook, by_epoch=False, interval=1000))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
# the data is not on this machine: the DDP doctor builds batches with this function instead
ddp_doctor = dict(synthetic_batch='projects.two_kinds.make_batch')
