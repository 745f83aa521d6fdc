# Mask R-CNN (real mmdet 3.3.0 config) cut down for CPU dry runs: ResNet-18, no pretrained download,
# and 64 sampled RoIs an image out of 200 proposals (the shipped 512 of 1000 make mmcv's CPU RoIAlign
# take most of a step: 5.5 s a step on 2 ranks here); every head is still trained.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', './_ddp_cpu_.py']
model = dict(backbone=dict(depth=18, init_cfg=None), neck=dict(in_channels=[64, 128, 256, 512]),
             train_cfg=dict(rpn_proposal=dict(max_per_img=200), rcnn=dict(sampler=dict(num=64))))
