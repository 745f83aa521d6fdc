# Mask R-CNN (real mmdet 3.3.0 config) cut down for CPU dry runs: ResNet-18, no pretrained download.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', './_ddp_cpu_.py']
model = dict(backbone=dict(depth=18, init_cfg=None), neck=dict(in_channels=[64, 128, 256, 512]))
