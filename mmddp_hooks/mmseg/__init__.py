'''mmsegmentation helpers (needs the ``[mmseg]`` extra): a synthetic dataset and an example segmentor.

Import it from a config: ``custom_imports = dict(imports=['mmddp_hooks', 'mmddp_hooks.mmseg'])``.
'''
from .synthetic import SyntheticSegDataset, use_synthetic_data
from .toggle_aux import ToggleAuxEncoderDecoder

__all__ = ['SyntheticSegDataset', 'ToggleAuxEncoderDecoder', 'use_synthetic_data']
