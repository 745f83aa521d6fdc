"""A small research-style package whose model changes what trains after the Runner wrapped it in DDP.

A foundation backbone with a few learnable prompt tokens, frozen three ways as such repositories
do, each after MMEngine's Runner has built DDP (in its ``__init__``, when every parameter still
requires a gradient): in the backbone's own ``train()`` (which the train loop calls before the
first iteration), in ``train()`` called by an optimizer constructor, and in a hook's
``before_train``. Plain DDP has registered the frozen layers: with ``find_unused_parameters=False``
it stops at the second iteration. The configs are in ``configs/examples/late_freeze/``.
"""
from .models import FreezeBackboneHook, LateFreezeNet, PromptedBackbone, TrainModeConstructor, make_batch

__all__ = ['FreezeBackboneHook', 'LateFreezeNet', 'PromptedBackbone', 'TrainModeConstructor',
           'make_batch']
