"""A small research-style package: one model trained on two kinds of batches.

Object boxes (``data_tag='det'``) train the box head; point prompts with a mask (``data_tag='sam'``)
train the prompt encoder and the mask decoder; both share the trunk. The caption adapter is built
but switched off in code, so it never reaches the loss. With ``keep_alive=True`` the model adds
what such repositories add so that DDP does not crash: every idle parameter times zero.

The configs in ``configs/examples/two_kinds/`` import it lazily (``from projects.two_kinds...``),
with the repository root on ``PYTHONPATH``, as OpenMMLab's ``projects/`` are.
"""
from .data import LoadPrompts, PackPromptInputs, PromptedImages, make_batch, write_demo_data
from .models import TwoKindModel

__all__ = ['LoadPrompts', 'PackPromptInputs', 'PromptedImages', 'TwoKindModel', 'make_batch',
           'write_demo_data']
