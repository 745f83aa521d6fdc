# A hook freezes the backbone in before_train; the backbone itself does not.
from mmengine.config import read_base

with read_base():
    from ._base_ import *  # noqa: F401,F403

from projects.late_freeze import FreezeBackboneHook  # noqa: E402

model.update(freeze_in_train=False)  # noqa: F405
custom_hooks = [dict(type=FreezeBackboneHook)]
