"""VICReg (Bardes, Ponce and LeCun 2022): invariance between the two views' projections, plus a
variance floor and a covariance penalty per branch that keep the dimensions alive and decorrelated.
The variance and covariance are over every process's batch (gathered with gradients)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from multissl.errors import ConfigError
from multissl.losses.vicreg import vicreg_loss
from multissl.objectives.barlow_twins import RedundancyReduction
from multissl.objectives.joint_embedding import two_views


@dataclass
class VICRegLossConfig:
    invariance: float = 25.0
    variance: float = 25.0
    covariance: float = 1.0

    def __post_init__(self) -> None:
        if min(self.invariance, self.variance, self.covariance) < 0:
            raise ConfigError("loss.invariance, loss.variance and loss.covariance must be >= 0")


class VICReg(RedundancyReduction):
    name = "vicreg"

    def loss(self, model: nn.Module, views: list[torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        features, (z1, z2), _ = two_views(model, views)
        c = self.loss_cfg
        loss, parts = vicreg_loss(z1, z2, c.invariance, c.variance, c.covariance, self.training_gather(model))
        return {"loss": loss, **parts}, features
