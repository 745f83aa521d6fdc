# YOLOv3-MobileNetV2 (real mmdet 3.3.0 config), as a user would first wire it in: the base config's
# top-level find_unused_parameters = True stays, and model_wrapper_cfg is added. MMEngine then builds
# DDP from model_wrapper_cfg alone: find_unused_parameters is DDP's default, False, and the backbone's
# conv2 (run, its output dropped by out_indices) crashes plain DDP at iteration 2.
_base_ = ['mmdet::yolo/yolov3_mobilenetv2_8xb24-ms-416-300e_coco.py', './_ddp_cpu_.py']
model = dict(backbone=dict(init_cfg=None))
train_dataloader = dict(batch_size=2)
model_wrapper_cfg = dict(_delete_=True, type='ReconfigurableDDP')
