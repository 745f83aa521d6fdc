# The model as such repositories ship it: every branch the batch does not use is kept "used" with
# a zero-weighted term, because DDP (find_unused_parameters=False) crashes otherwise. The DDP
# doctor finds the terms, names their line, and the plan the usage has without them.
from mmengine.config import read_base

with read_base():
    from ._base_ import *  # noqa: F401,F403

model.update(keep_alive=True)  # noqa: F405
