"""Rotation prediction (Gidaris et al. 2018, "Unsupervised representation learning by predicting
image rotations"): every image is shown at 0, 90, 180 and 270 degrees and a small head on the
backbone says which. To tell a rotated object from an upright one the backbone has to find the
object and its parts, so its features transfer; no pairs, negatives, teacher or collapse to guard
against. It is the classic pretext-task baseline: a joint-embedding method that does not beat it
on a probe has learned nothing the simplest recipe would not.

The model is ``JointEmbeddingModel(backbone, head)``: the rotation head sits where the base calls
the projector (``model.projector``); only the backbone is exported, in timm's format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from multissl.data.views import view_transform
from multissl.errors import ConfigError
from multissl.metrics import Mean
from multissl.models.backbones import BackboneConfig
from multissl.models.heads import mlp
from multissl.objectives.joint_embedding import JointEmbedding, JointEmbeddingModel, feature_width

ROTATIONS = 4
"""0, 90, 180 and 270 degrees: the paper found four the best trade-off (two are too easy, eight
add 45-degree rotations whose corners betray them)."""


@dataclass
class RotationHeadConfig:
    """The classifier on the backbone's features; its output is always the 4 rotations."""

    hidden: list[int] = field(default_factory=list)
    """Hidden widths (Linear-BN-ReLU each); empty = one linear layer. A hidden layer takes up what
    is specific to rotations (the paper saw the last layers specialise): on the tiny digits preset
    ``[256]`` raised the probes from linear 0.888 / kNN 0.669 to 0.912 / 0.842 at the same rotation
    accuracy (0.83)."""

    def __post_init__(self) -> None:
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"model.head.hidden widths must be >= 1, got {self.hidden}")

    def dims(self, in_dim: int) -> list[int]:
        return [in_dim, *self.hidden, ROTATIONS]


@dataclass
class RotationModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: RotationHeadConfig = field(default_factory=RotationHeadConfig)


def rotate_four_ways(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` (B, C, S, S) -> ``(rotated (4B, C, S, S), labels (4B,))``: the batch at 0, 90, 180,
    270 degrees counter-clockwise, in that order (label k = k quarter turns). Done on the images'
    device, so the collator decodes and augments each image once instead of four times."""
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"rotation prediction needs square images (B, C, S, S), got {tuple(images.shape)}")
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


def rotation_loss(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cross-entropy over all 4B rotated images, number predicted right, backbone features of the
    unrotated images (B, D))``. All four rotations go through ``model`` in one forward, so batch
    norms see them together (as the paper's code feeds them). A batch of no images scores 0."""
    rotated, labels = rotate_four_ways(images)
    features, logits, _ = model(rotated)
    loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum") / max(len(labels), 1)
    correct = (logits.detach().argmax(1) == labels).sum()
    return loss, correct, features[: images.shape[0]]


class Rotation(JointEmbedding):
    """One augmented view a batch; the four rotations are made from it on the device."""

    name = "rotation"
    card_metrics = ("rotation_accuracy", "loss")
    collapse_advice = "lower trainer.lr, or check that the images are not all alike (blank, or rotation-symmetric)"

    def __init__(self, model: RotationModelConfig, **kwargs: Any) -> None:
        self.model_cfg = model
        super().__init__(model.backbone, **kwargs)

    def build_model(self, backbone: nn.Module) -> JointEmbeddingModel:
        return JointEmbeddingModel(backbone, mlp(self.model_cfg.head.dims(feature_width(backbone))))

    def view_transforms(self) -> list[Any]:
        return [view_transform(self.augment)]

    def loss(self, model: nn.Module, views: list[torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        loss, correct, features = rotation_loss(model, views[0])
        return {"loss": loss, "rotation_accuracy": Mean(correct.float(), ROTATIONS * views[0].shape[0])}, features
