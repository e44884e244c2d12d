"""SimCLR (Chen et al. 2020): two augmented views of each image, a projector MLP, NT-Xent over the
batch with negatives from every process. The exported model is the backbone alone, in timm's format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multissl.data.views import AugmentConfig, ViewsCollator, view_transform
from multissl.errors import ConfigError
from multissl.losses.nt_xent import nt_xent
from multissl.metrics import Mean
from multissl.models.backbones import (
    BackboneConfig,
    build_backbone,
    eval_transform_of,
    save_backbone,
    set_preprocessing,
)
from multissl.training.objective import ModelCardInfo, Objective, TrainContext


@dataclass
class SimCLRModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    projector_hidden: int = 512
    projector_dim: int = 128
    """SimCLR projects to 128 for the loss; the backbone's features are what transfers."""


@dataclass
class SimCLRLossConfig:
    temperature: float = 0.5
    """0.5 for CIFAR-sized data, 0.1 for ImageNet (the paper's)."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"loss.temperature must be > 0, got {self.temperature}")


class BackboneWithProjector(nn.Module):
    """``backbone(x)`` -> pooled features; ``projector`` (Linear-BN-ReLU-Linear) -> the loss's space."""

    def __init__(self, backbone: nn.Module, hidden: int, out: int) -> None:
        super().__init__()
        self.backbone = backbone
        dim = backbone.num_features
        self.projector = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, out))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(images))


class SimCLR(Objective):
    """Batches ``{"views": [v1, v2], "labels", "skipped"}``; eval uses two fixed-seed views too."""

    name = "simclr"
    modality = "image"

    def __init__(self, model_cfg: SimCLRModelConfig, loss: SimCLRLossConfig, augment: AugmentConfig,
                 on_bad_image: str = "skip", max_image_pixels: int = 64_000_000) -> None:
        self.model_cfg, self.loss_cfg, self.augment = model_cfg, loss, augment
        backbone = build_backbone(model_cfg.backbone)
        set_preprocessing(backbone, augment.size, augment.mean, augment.std)
        self.model = BackboneWithProjector(backbone, model_cfg.projector_hidden, model_cfg.projector_dim)
        self.eval_tf = eval_transform_of(backbone)  # probes see what users of the saved folder will
        self._collator = ViewsCollator([view_transform(augment), view_transform(augment)], on_bad_image,
                                       max_image_pixels)
        self.rank = 0
        self.gather: Any = None

    def collator(self) -> ViewsCollator:
        return self._collator

    def count(self, batch: dict[str, Any]) -> dict[str, float]:
        return {"samples": int(batch["labels"].shape[0]), "skipped_images": int(batch.get("skipped", 0))}

    def setup(self, context: TrainContext) -> None:
        self.rank, self.gather = context.rank, context.gather

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        v1, v2 = batch["views"]
        z = model(torch.cat([v1, v2]))  # one forward: batch-norm statistics over both views
        z1, z2 = z.chunk(2)
        # negatives from every process while training (all step together); eval batches can be
        # uneven across processes, so each is scored on its own
        loss, correct = nt_xent(z1, z2, self.loss_cfg.temperature, self.gather if model.training else None,
                                self.rank if model.training else 0)
        n = 2 * v1.shape[0]
        return {"loss": Mean(loss * n, n), "contrastive_accuracy": Mean(correct.float(), n)}

    def export(self, model: nn.Module) -> nn.Module:
        return model.backbone if isinstance(model, BackboneWithProjector) else model

    def features(self, model: nn.Module, inputs: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        from multissl.models.features import image_features

        return image_features(self.export(model), self.eval_tf, inputs, batch_size, pooled=True)

    def save_pretrained(self, model: nn.Module, output_dir: Path) -> None:
        save_backbone(model, output_dir)

    def model_card(self) -> ModelCardInfo:
        backbone = self.export(self.model)
        return ModelCardInfo(
            method=self.name, arch=self.model_cfg.backbone.name, size=self.model_cfg.backbone.size,
            parameters=sum(p.numel() for p in backbone.parameters()), library_name="timm",
            pipeline_tag="image-feature-extraction", card_metrics=("contrastive_accuracy", "loss"), auto_class="timm",
            usage=("import timm\n\n"
                   'model = timm.create_model("{open_clip_ref}", pretrained=True).eval()\n'
                   "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))\n"
                   "features = model(transform(pil_image.convert(\"RGB\")).unsqueeze(0))  # (1, num_features)"))
