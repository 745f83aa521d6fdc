"""The model, the optimizer constructor and the hook that freeze the backbone after the wrap."""
from typing import Optional

import torch
import torch.nn.functional as F
from mmengine.hooks import Hook
from mmengine.model import BaseModel, is_model_wrapper
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import HOOKS, OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn


class PromptedBackbone(nn.Module):
    """Frozen layers and learnable prompt tokens; with ``freeze_in_train`` the layers are frozen
    in ``train()``, as a backbone that must stay frozen whatever ``model.train()`` does."""

    def __init__(self, width: int = 8, freeze_in_train: bool = True) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        self.prompt = nn.Parameter(torch.zeros(width))
        self.freeze_in_train = freeze_in_train

    def train(self, mode: bool = True) -> 'PromptedBackbone':
        super().train(mode)
        if self.freeze_in_train:
            self._freeze_layers()
        return self

    def _freeze_layers(self) -> None:
        for p in self.layers.parameters():
            p.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x + self.prompt)


class LateFreezeNet(BaseModel):
    """The backbone and a linear head, trained on regression targets."""

    def __init__(self, width: int = 8, freeze_in_train: bool = True,
                 data_preprocessor: Optional[dict] = None) -> None:
        super().__init__(data_preprocessor=data_preprocessor)
        self.backbone = PromptedBackbone(width, freeze_in_train)
        self.head = nn.Linear(width, 2)

    def forward(self, inputs: torch.Tensor, data_samples: Optional[torch.Tensor] = None,
                mode: str = 'tensor'):
        out = self.head(self.backbone(inputs))
        return dict(loss=F.mse_loss(out, data_samples)) if mode == 'loss' else out


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class TrainModeConstructor(DefaultOptimWrapperConstructor):
    """Puts the model in training mode before it builds the optimizer (some repositories do, to
    read which parameters train): the backbone's ``train()`` freezes it there."""

    def __call__(self, model: nn.Module):
        model.train()
        return super().__call__(model)


@HOOKS.register_module()
class FreezeBackboneHook(Hook):
    """Freezes the backbone's layers when training starts."""

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        model.backbone.layers.requires_grad_(False)


def make_batch(index: int, batch_size: int, width: int = 8) -> dict:
    """The DDP doctor's batch builder (``ddp_doctor = dict(synthetic_batch=...)``): inputs and
    regression targets, drawn from ``index``."""
    gen = torch.Generator().manual_seed(index)
    return dict(inputs=torch.randn(batch_size, width, generator=gen),
                data_samples=torch.randn(batch_size, 2, generator=gen))
