# The backbone freezes itself in train(): the train loop's model.train() before iteration 1.
from mmengine.config import read_base

with read_base():
    from ._base_ import *  # noqa: F401,F403
