"""Example segmentor: the auxiliary head is built from the config but a flag switches its loss off.

This is the shape of many real unused-parameter crashes: ``use_auxiliary_head=False`` in a config,
while the head's module (and its parameters) still exist, so DDP waits for gradients that never come.
"""
from typing import Dict

from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS


@MODELS.register_module()
class ToggleAuxEncoderDecoder(EncoderDecoder):
    def __init__(self, *args, use_auxiliary_head: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.use_auxiliary_head = use_auxiliary_head

    def _auxiliary_head_forward_train(self, inputs, data_samples) -> Dict:
        if not self.use_auxiliary_head:
            return dict()
        return super()._auxiliary_head_forward_train(inputs, data_samples)
