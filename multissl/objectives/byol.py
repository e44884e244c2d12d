"""BYOL (Grill et al. 2020) and SimSiam (Chen and He 2021): predict one view's projection from the
other's, with a stop-gradient on the side being predicted and no negatives.

BYOL predicts an EMA target's projection (momentum 0.996 -> 1 along a cosine) with the loss
``2 - 2 cos``; SimSiam predicts its own, stop-gradient, projection (negative cosine, -1 at best),
its predictor trained at a fixed learning rate, as the paper found best. Both losses are symmetric.
A SimSiam loss stuck near -1 with the features' std near 0 is the collapse the paper describes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from multissl.losses.negative_cosine import negative_cosine
from multissl.models.backbones import BackboneConfig
from multissl.models.heads import mlp
from multissl.objectives.joint_embedding import (
    HeadConfig,
    JointEmbedding,
    JointEmbeddingModel,
    MomentumConfig,
    feature_width,
    target_of,
    target_projections,
    two_views,
)
from multissl.training.objective import ParamGroup


@dataclass
class BYOLModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    projector: HeadConfig = field(default_factory=lambda: HeadConfig(hidden=[4096], out=256))
    predictor: HeadConfig = field(default_factory=lambda: HeadConfig(hidden=[4096], out=256))
    momentum: MomentumConfig = field(default_factory=lambda: MomentumConfig(base=0.996, final=1.0))


class BYOL(JointEmbedding):
    name = "byol"
    collapse_advice = "lower trainer.lr, raise model.momentum.base (e.g. 0.99 -> 0.996), or use a larger batch"

    def __init__(self, model: BYOLModelConfig, **kwargs: Any) -> None:
        self.model_cfg = model
        super().__init__(model.backbone, **kwargs)
        self.target = target_of(self.model)
        self.momentum = model.momentum

    def build_model(self, backbone: nn.Module) -> JointEmbeddingModel:
        cfg = self.model_cfg
        return JointEmbeddingModel(backbone, mlp(cfg.projector.dims(feature_width(backbone))),
                                   mlp(cfg.predictor.dims(cfg.projector.out)))

    def loss(self, model: nn.Module, views: list[torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        assert self.target is not None
        features, _, (p1, p2) = two_views(model, views)
        t1, t2 = target_projections(self.target, views)
        cos = -(negative_cosine(p1, t2) + negative_cosine(p2, t1)) / 2
        return {"loss": 2 * (2 - 2 * cos), "cosine_similarity": cos.detach()}, features


@dataclass
class SimSiamModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    projector: HeadConfig = field(default_factory=lambda: HeadConfig(hidden=[2048, 2048], out=2048))
    """Three layers, batch norm on every one including the output (the paper's ImageNet head)."""
    predictor: HeadConfig = field(default_factory=lambda: HeadConfig(hidden=[512], out=2048))
    """A bottleneck 2048 -> 512 -> 2048."""
    fixed_predictor_lr: bool = True
    """Keep the predictor at the base learning rate instead of the schedule (the paper's choice)."""


class SimSiam(JointEmbedding):
    name = "simsiam"
    collapse_advice = ("check the stop-gradient is in place (loss at -1.0 is collapse), keep the predictor's lr fixed "
                       "(model.fixed_predictor_lr=true), or lower trainer.lr")

    def __init__(self, model: SimSiamModelConfig, **kwargs: Any) -> None:
        self.model_cfg = model
        super().__init__(model.backbone, **kwargs)

    def build_model(self, backbone: nn.Module) -> JointEmbeddingModel:
        cfg = self.model_cfg
        projector = mlp(cfg.projector.dims(feature_width(backbone)), last_batch_norm=True, last_affine=False)
        return JointEmbeddingModel(backbone, projector, mlp(cfg.predictor.dims(cfg.projector.out)))

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        predictor = [p for p in model.predictor.parameters() if p.requires_grad]
        ids = {id(p) for p in predictor}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return [ParamGroup(rest), ParamGroup(predictor, name="predictor", fixed_lr=self.model_cfg.fixed_predictor_lr)]

    def loss(self, model: nn.Module, views: list[torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        features, (z1, z2), (p1, p2) = two_views(model, views)
        loss = (negative_cosine(p1, z2.detach()) + negative_cosine(p2, z1.detach())) / 2
        return {"loss": loss}, features
