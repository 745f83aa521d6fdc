# use_point_prompt=True, but the model never adds the point encoder's output to the loss: the hook
# warns "enabled by model.use_point_prompt=True but never reached the loss" (an error with strict).
_base_ = ['./_base_.py']
model = dict(use_point_prompt=True)
