"""Example: a small RapSAM-like segmentor whose config toggles switch branches on and off
(``configs/examples/rapsam_like/``; registered on import: ``custom_imports``, with the repository
root on ``PYTHONPATH``)."""
from .models import FusionDecodeHead, RandomSegPairs, RapSAMLikeSegmentor

__all__ = ['FusionDecodeHead', 'RandomSegPairs', 'RapSAMLikeSegmentor']
