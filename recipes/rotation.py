"""Rotation-prediction image pretraining (4-way 0/90/180/270 classification) on any timm backbone:
the classic pretext-task baseline every image-SSL method should beat.

python recipes/rotation.py [--config recipes/configs/rotation/tiny.yaml] [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from multissl import config
from multissl.data.views import AugmentConfig
from multissl.image_ssl import ImageSSLSections, fit_image_ssl
from multissl.objectives.rotation import Rotation, RotationModelConfig
from multissl.training.config import TrainerConfig
from multissl.training.state import FitResult

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "rotation" / "tiny.yaml"


@dataclass
class RotationConfig(ImageSSLSections):
    model: RotationModelConfig = field(default_factory=RotationModelConfig)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(jitter=0.0, grayscale=0.0))
    """The paper's augmentation is a random crop and a flip only: the rotation is the task."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        output_dir="outputs/rotation", optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
        max_grad_norm=0.0))
    """The paper's SGD (batch 128 images, each at 4 rotations), no clipping."""


def main(argv: list[str] | None = None) -> FitResult:
    cfg = config.load(RotationConfig, argv, DEFAULT_CONFIG)
    return fit_image_ssl(cfg, lambda **kw: Rotation(cfg.model, **kw))


if __name__ == "__main__":
    from multissl.cli import run_recipe

    run_recipe(main)
