"""Masked-autoencoder image pretraining (MAE) over transformers' ViTMAEForPreTraining; the encoder is
saved as a transformers ViTModel with its image processor.

python recipes/mae.py [--config recipes/configs/mae/tiny.yaml] [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from multissl import config
from multissl.data.views import AugmentConfig
from multissl.image_ssl import ImageSSLSections, fit_image_ssl
from multissl.objectives.mae import MAE, MAELossConfig, MAEModelConfig
from multissl.training.config import TrainerConfig
from multissl.training.state import FitResult

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "mae" / "tiny.yaml"


@dataclass
class MAEConfig(ImageSSLSections):
    model: MAEModelConfig = field(default_factory=MAEModelConfig)
    loss: MAELossConfig = field(default_factory=MAELossConfig)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(
        size=224, scale=(0.2, 1.0), jitter=0.0, grayscale=0.0))
    """The paper's: random resized crop (0.2-1) and flip, nothing else."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        output_dir="outputs/mae", lr=1.5e-4, adam_betas=(0.9, 0.95), weight_decay=0.05, warmup_ratio=0.05,
        max_grad_norm=0.0))


def main(argv: list[str] | None = None) -> FitResult:
    cfg = config.load(MAEConfig, argv, DEFAULT_CONFIG)
    return fit_image_ssl(cfg, lambda **kw: MAE(cfg.model, cfg.loss, **kw))


if __name__ == "__main__":
    from multissl.cli import run_recipe

    run_recipe(main)
