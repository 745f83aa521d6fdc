"""Example: a two-tower retriever trained with GlobalInBatchInfoNCE on synthetic paired views."""
from typing import Dict

import torch
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, MODELS
from torch import nn
from torch.utils.data import Dataset


@DATASETS.register_module()
class PairedViewsDataset(Dataset):
    """Pairs (x, x @ M + noise) for a fixed random M: each row's positive is its other view."""

    def __init__(self, length: int = 512, dim: int = 16, noise: float = 0.3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        mixing = torch.randn(dim, dim, generator=g)
        self.query = torch.randn(length, dim, generator=g)
        self.key = self.query @ mixing + noise * torch.randn(length, dim, generator=g)

    def __len__(self) -> int:
        return len(self.query)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return dict(query=self.query[i], key=self.key[i])


@MODELS.register_module()
class TwoTowerRetriever(BaseModel):
    def __init__(self, in_dim: int = 16, embed_dim: int = 8, loss: dict = None) -> None:
        super().__init__()
        self.query_tower = nn.Sequential(nn.Linear(in_dim, 32), nn.ReLU(), nn.Linear(32, embed_dim))
        self.key_tower = nn.Sequential(nn.Linear(in_dim, 32), nn.ReLU(), nn.Linear(32, embed_dim))
        self.criterion = MODELS.build(loss or dict(type='GlobalInBatchInfoNCE'))

    def forward(self, query, key, mode='loss'):
        q, k = self.query_tower(query), self.key_tower(key)
        if mode == 'loss':
            return self.criterion(q, k)
        return [dict(query=qi, key=ki) for qi, ki in zip(q, k)]
