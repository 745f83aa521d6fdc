'''mmsegmentation helpers (needs the ``[mmseg]`` extra): an example segmentor.

Import it from a config: ``custom_imports = dict(imports=['mmddp_hooks', 'mmddp_hooks.mmseg'])``.
'''
from .toggle_aux import ToggleAuxEncoderDecoder

__all__ = ['ToggleAuxEncoderDecoder']
