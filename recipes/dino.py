"""DINO image pretraining (self-distillation: multi-crop student, centred and sharpened EMA teacher) on any timm backbone.

python recipes/dino.py [--config recipes/configs/dino/tiny.yaml] [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from multissl import config
from multissl.data.views import AugmentConfig
from multissl.image_ssl import ImageSSLSections, fit_image_ssl
from multissl.objectives.dino import DINO, DINOLossConfig, DINOModelConfig, LocalCropsConfig
from multissl.training.config import TrainerConfig
from multissl.training.state import FitResult

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "dino" / "tiny.yaml"


@dataclass
class DINOConfig(ImageSSLSections):
    model: DINOModelConfig = field(default_factory=DINOModelConfig)
    loss: DINOLossConfig = field(default_factory=DINOLossConfig)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(
        size=224, scale=(0.4, 1.0), blur=1.0, second_view_blur=0.1, second_view_solarize=0.2))
    """The two global crops (only the teacher's inputs)."""
    local: LocalCropsConfig = field(default_factory=LocalCropsConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        output_dir="outputs/dino", lr=5e-4, weight_decay=0.04, weight_decay_end=0.4, warmup_ratio=0.1,
        max_grad_norm=3.0))
    """AdamW at 5e-4 x batch/256 after a 10-epoch warm-up, weight decay 0.04 -> 0.4, clip 3."""


def main(argv: list[str] | None = None) -> FitResult:
    cfg = config.load(DINOConfig, argv, DEFAULT_CONFIG)
    return fit_image_ssl(cfg, lambda **kw: DINO(cfg.model, cfg.loss, cfg.local, **kw))


if __name__ == "__main__":
    from multissl.cli import run_recipe

    run_recipe(main)
