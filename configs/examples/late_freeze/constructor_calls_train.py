# The optimizer constructor calls model.train(), where the backbone freezes itself.
from mmengine.config import read_base

with read_base():
    from ._base_ import *  # noqa: F401,F403

from projects.late_freeze import TrainModeConstructor  # noqa: E402

optim_wrapper.update(constructor=TrainModeConstructor)  # noqa: F405
