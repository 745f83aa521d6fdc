_base_ = ['./_base_.py']
model = dict(decode_head=dict(use_learnable_fusion=False), use_resolution_distill=True,
             use_sam_distill=True)
