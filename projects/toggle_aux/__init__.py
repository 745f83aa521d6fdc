'''Example mmsegmentation segmentor (needs the ``[mmseg]`` extra) whose auxiliary loss a config flag
switches off (``configs/mmseg/fcn_r18_aux-off.py``; registered on import: ``custom_imports``, with
the repository root on ``PYTHONPATH``).'''
from .models import ToggleAuxEncoderDecoder

__all__ = ['ToggleAuxEncoderDecoder']
