"""Barlow Twins (Zbontar et al. 2021): make the cross-correlation of the two views' projections,
over the batch, the identity. The batch statistics are over every process's batch (gathered with
gradients), so several processes train exactly as one with their batches joined."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from multissl.errors import ConfigError
from multissl.losses.barlow_twins import barlow_twins_loss
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
class RedundancyModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    projector: HeadConfig = field(default_factory=lambda: HeadConfig(hidden=[8192, 8192], out=8192))
    """Three layers of 8192 (the papers'); Linear-BN-ReLU between them, a plain Linear at the end."""


@dataclass
class BarlowTwinsLossConfig:
    lambda_offdiag: float = 5e-3
    """Weight of the off-diagonal (redundancy) terms against the diagonal (invariance) ones."""

    def __post_init__(self) -> None:
        if not self.lambda_offdiag >= 0:
            raise ConfigError(f"loss.lambda_offdiag must be >= 0, got {self.lambda_offdiag}")


class RedundancyReduction(JointEmbedding):
    """Barlow Twins and VICReg: the same backbone + wide projector, differing only in the loss."""

    def __init__(self, model: RedundancyModelConfig, loss: Any, **kwargs: Any) -> None:
        self.model_cfg, self.loss_cfg = model, loss
        super().__init__(model.backbone, **kwargs)

    def build_model(self, backbone: nn.Module) -> JointEmbeddingModel:
        return JointEmbeddingModel(backbone, mlp(self.model_cfg.projector.dims(feature_width(backbone))))


class BarlowTwins(RedundancyReduction):
    name = "barlow_twins"

    def loss(self, model: nn.Module, views: list[torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        features, (z1, z2), _ = two_views(model, views)
        loss, parts = barlow_twins_loss(z1, z2, self.loss_cfg.lambda_offdiag, self.training_gather(model))
        return {"loss": loss, **parts}, features
