"""Example models and datasets (registered on import: ``custom_imports`` in the example configs)."""
from .rapsam_like import FusionDecodeHead, RandomSegPairs, RapSAMLikeSegmentor
from .two_tower import PairedViewsDataset, TwoTowerRetriever

__all__ = ['FusionDecodeHead', 'PairedViewsDataset', 'RandomSegPairs', 'RapSAMLikeSegmentor',
           'TwoTowerRetriever']
