# DETR (real mmdet 3.3.0 config) cut down for CPU dry runs: ResNet-18 (its last stage feeds the
# transformer), no pretrained download.
_base_ = ['mmdet::detr/detr_r50_8xb2-150e_coco.py', './_ddp_cpu_.py']
model = dict(backbone=dict(depth=18, init_cfg=None), neck=dict(in_channels=[512]))
