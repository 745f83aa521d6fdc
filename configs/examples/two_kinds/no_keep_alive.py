# The same model with the zero-weighted terms deleted: plain DDP (find_unused_parameters=False, as
# written) crashes, and DDPAutoTuneHook trains it exactly as find_unused_parameters=True would.
from mmengine.config import read_base

with read_base():
    from ._base_ import *  # noqa: F401,F403

model.update(keep_alive=False)  # noqa: F405
