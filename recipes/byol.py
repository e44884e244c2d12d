"""BYOL image pretraining (online network predicts an EMA target's projection) on any timm backbone.

python recipes/byol.py [--config recipes/configs/byol/tiny.yaml] [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from multissl import config
from multissl.data.views import AugmentConfig
from multissl.image_ssl import ImageSSLSections, fit_image_ssl
from multissl.objectives.byol import BYOL, BYOLModelConfig
from multissl.training.config import TrainerConfig
from multissl.training.state import FitResult

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "byol" / "tiny.yaml"


@dataclass
class BYOLConfig(ImageSSLSections):
    model: BYOLModelConfig = field(default_factory=BYOLModelConfig)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(
        blur=1.0, second_view_blur=0.1, second_view_solarize=0.2))
    """BYOL's asymmetric views: blur always on view 1, rarely on view 2, which is sometimes solarised."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        output_dir="outputs/byol", optimizer="lars", lr=0.2, weight_decay=1.5e-6, warmup_ratio=0.01,
        max_grad_norm=0.0))
    """The paper's LARS at 0.2 x batch/256 with cosine decay; the tiny preset steps with SGD (momentum 0.9, lr 0.1)."""


def main(argv: list[str] | None = None) -> FitResult:
    cfg = config.load(BYOLConfig, argv, DEFAULT_CONFIG)
    return fit_image_ssl(cfg, lambda **kw: BYOL(cfg.model, **kw))


if __name__ == "__main__":
    from multissl.cli import run_recipe

    run_recipe(main)
