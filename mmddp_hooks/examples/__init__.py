"""Example models and datasets (registered on import: ``custom_imports`` in the example configs)."""
from .two_tower import PairedViewsDataset, TwoTowerRetriever

__all__ = ['PairedViewsDataset', 'TwoTowerRetriever']
