"""Example: a two-tower retriever trained with GlobalInBatchInfoNCE (``configs/examples/
two_tower_infonce.py``; registered on import: ``custom_imports``, with the repository root on
``PYTHONPATH``)."""
from .models import PairedViewsDataset, TwoTowerRetriever

__all__ = ['PairedViewsDataset', 'TwoTowerRetriever']
