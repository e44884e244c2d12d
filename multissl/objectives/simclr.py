"""SimCLR (Chen et al. 2020): two augmented views of each image, a projector MLP, NT-Xent over the
batch with negatives from every process. The exported model is the backbone alone, in timm's format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from multissl.errors import ConfigError
from multissl.losses.nt_xent import nt_xent
from multissl.metrics import Mean
from multissl.models.backbones import BackboneConfig
from multissl.models.heads import mlp
from multissl.objectives.joint_embedding import (
    HeadConfig,
    JointEmbedding,
    JointEmbeddingModel,
    feature_width,
    two_views,
)


@dataclass
class SimCLRModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    projector: HeadConfig = field(default_factory=lambda: HeadConfig(hidden=[2048], out=128))
    """Linear-BN-ReLU-Linear to 128 for the loss; the backbone's features are what transfers."""


@dataclass
class SimCLRLossConfig:
    temperature: float = 0.5
    """0.5 for CIFAR-sized data, 0.1 for ImageNet (the paper's)."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"loss.temperature must be > 0, got {self.temperature}")


class SimCLR(JointEmbedding):
    name = "simclr"
    card_metrics = ("contrastive_accuracy", "loss")

    def __init__(self, model: SimCLRModelConfig, loss: SimCLRLossConfig, **kwargs: Any) -> None:
        self.model_cfg, self.loss_cfg = model, loss
        super().__init__(model.backbone, **kwargs)

    def build_model(self, backbone: nn.Module) -> JointEmbeddingModel:
        return JointEmbeddingModel(backbone, mlp(self.model_cfg.projector.dims(feature_width(backbone))))

    def loss(self, model: nn.Module, views: list[torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        features, (z1, z2), _ = two_views(model, views)
        loss, correct = nt_xent(z1, z2, self.loss_cfg.temperature, self.training_gather(model),
                                offset=self.training_offset(model, z1.shape[0]))
        return {"loss": loss, "contrastive_accuracy": Mean(correct.float(), 2 * z1.shape[0])}, features
