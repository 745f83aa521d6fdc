"""The model: a shared trunk, a head per batch kind, and an adapter nothing calls."""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from mmengine.model import BaseModel
from torch import nn


class TwoKindModel(BaseModel):
    """Boxes for ``data_tag='det'`` samples, point prompts and masks for ``'sam'`` ones.

    Args:
        channels: trunk width.
        keep_alive: add ``0.0 * (every idle parameter)`` to the loss, the hack that keeps DDP with
            ``find_unused_parameters=False`` from crashing on the branch a batch does not use.
    """

    def __init__(self, channels: int = 8, keep_alive: bool = False,
                 data_preprocessor: Optional[dict] = None) -> None:
        super().__init__(data_preprocessor=data_preprocessor)
        self.trunk = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
        self.box_head = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(channels, 4, 1))
        self.prompt_encoder = nn.Linear(2, channels)
        self.mask_decoder = nn.Conv2d(channels, 1, 1)
        self.caption_adapter = nn.Linear(channels, channels)  # for captions: switched off
        self.keep_alive = keep_alive

    def forward(self, inputs: torch.Tensor, data_samples: Optional[List] = None,
                mode: str = 'tensor'):
        feats = self.trunk(inputs.float() / 255)
        if mode != 'loss':
            return feats
        tags = [s.data_tag for s in data_samples]
        losses: Dict[str, torch.Tensor] = {}
        det = [i for i, t in enumerate(tags) if t == 'det']
        sam = [i for i, t in enumerate(tags) if t == 'sam']
        if det:
            boxes = self.box_head(feats[det]).mean((2, 3))
            target = torch.stack([data_samples[i].gt_boxes.float().mean(0) for i in det])
            losses['loss_box'] = F.smooth_l1_loss(boxes, target / inputs.shape[-1])
        if sam:
            points = torch.stack([data_samples[i].points.float().mean(0) for i in sam])
            prompt = self.prompt_encoder(points / inputs.shape[-1])
            logits = self.mask_decoder(feats[sam] + prompt[:, :, None, None])
            target = torch.stack([data_samples[i].gt_mask for i in sam]).float()[:, None]
            losses['loss_mask'] = F.binary_cross_entropy_with_logits(logits, target)
        if self.keep_alive:
            idle = [self.caption_adapter] + ([] if det else [self.box_head]) + \
                ([] if sam else [self.prompt_encoder, self.mask_decoder])
            first = next(iter(losses))
            losses[first] = losses[first] + 0.0 * sum(p.sum() for m in idle for p in m.parameters())
        return losses
