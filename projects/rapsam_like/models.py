"""Example: a small RapSAM-like segmentor whose config toggles switch branches on and off.

Every branch is *built* whatever its toggle says (as in the real model), so a switched-off branch is
exactly the "parameters that did not receive grad" crash that ``ddp_branches`` prevents.
``use_point_prompt=True`` reproduces a user bug on purpose: the point encoder runs, but its output
never reaches the loss.
"""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, MODELS
from torch import nn
from torch.utils.data import Dataset


@DATASETS.register_module()
class RandomSegPairs(Dataset):
    """Random float images (3, H, W) and integer masks (H, W), deterministic per index."""

    def __init__(self, length: int = 32, size: int = 16, num_classes: int = 4) -> None:
        self.length, self.size, self.num_classes = length, size, num_classes

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(3, self.size, self.size, generator=g),
                    masks=torch.randint(0, self.num_classes, (self.size, self.size), generator=g))


@MODELS.register_module()
class FusionDecodeHead(nn.Module):
    """Fuses feature levels with learnable softmax weights, or a plain mean when switched off."""

    def __init__(self, channels: int = 8, num_levels: int = 3, num_classes: int = 4,
                 use_learnable_fusion: bool = True) -> None:
        super().__init__()
        self.use_learnable_fusion = use_learnable_fusion
        self.fusion_weights = nn.ParameterList(nn.Parameter(torch.zeros(1))
                                               for _ in range(num_levels))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        if self.use_learnable_fusion:
            w = torch.softmax(torch.cat(list(self.fusion_weights)), dim=0)
            fused = sum(wi * f for wi, f in zip(w, feats))
        else:
            fused = torch.stack(feats).mean(0)
        return self.classifier(fused)


@MODELS.register_module()
class RapSAMLikeSegmentor(BaseModel):
    def __init__(self, channels: int = 8, decode_head: Optional[dict] = None,
                 use_resolution_distill: bool = False, use_sam_distill: bool = False,
                 use_point_prompt: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.levels = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(3))
        self.decode_head = FusionDecodeHead(channels=channels, **(decode_head or {}))
        self.resolution_distill = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(),
                                                nn.Conv2d(channels, channels, 1))
        self.sam_distill = nn.Conv2d(channels, channels, 1)
        self.point_encoder = nn.Linear(2, channels)
        self.use_resolution_distill = use_resolution_distill
        self.use_sam_distill = use_sam_distill
        self.use_point_prompt = use_point_prompt

    def forward(self, inputs, masks=None, mode='loss'):
        x = F.relu(self.stem(inputs))
        feats = []
        for level in self.levels:
            x = F.relu(level(x))
            feats.append(x)
        logits = self.decode_head(feats)
        if mode != 'loss':
            return logits.argmax(1)
        losses = dict(loss_seg=F.cross_entropy(logits, masks))
        if self.use_resolution_distill:
            student = self.resolution_distill(F.avg_pool2d(feats[0], 2))
            losses['loss_res_distill'] = F.mse_loss(student, F.avg_pool2d(feats[-1], 2).detach())
        if self.use_sam_distill:
            losses['loss_sam_distill'] = 0.1 * F.mse_loss(self.sam_distill(feats[-1]),
                                                          feats[0].detach())
        if self.use_point_prompt:
            self._prompt = self.point_encoder(torch.rand(inputs.shape[0], 2))  # BUG: never used
        return losses
