_base_ = ['./_base_.py']
model = dict(decode_head=dict(use_learnable_fusion=True), use_resolution_distill=False,
             use_sam_distill=True)
