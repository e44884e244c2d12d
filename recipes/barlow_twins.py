"""Barlow Twins image pretraining (cross-correlation to the identity) on any timm backbone.

python recipes/barlow_twins.py [--config recipes/configs/barlow_twins/tiny.yaml] [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from multissl import config
from multissl.data.views import AugmentConfig
from multissl.image_ssl import ImageSSLSections, fit_image_ssl
from multissl.objectives.barlow_twins import BarlowTwins, BarlowTwinsLossConfig, RedundancyModelConfig
from multissl.training.config import TrainerConfig
from multissl.training.state import FitResult

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "barlow_twins" / "tiny.yaml"


@dataclass
class BarlowTwinsConfig(ImageSSLSections):
    model: RedundancyModelConfig = field(default_factory=RedundancyModelConfig)
    loss: BarlowTwinsLossConfig = field(default_factory=BarlowTwinsLossConfig)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(
        blur=1.0, second_view_blur=0.1, second_view_solarize=0.2))
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        output_dir="outputs/barlow_twins", optimizer="lars", lr=0.2, weight_decay=1.5e-6, warmup_ratio=0.01,
        max_grad_norm=0.0))
    """The paper's LARS (lr 0.2 x batch/256 for weights), warm-up then cosine."""


def main(argv: list[str] | None = None) -> FitResult:
    cfg = config.load(BarlowTwinsConfig, argv, DEFAULT_CONFIG)
    return fit_image_ssl(cfg, lambda **kw: BarlowTwins(cfg.model, cfg.loss, **kw))


if __name__ == "__main__":
    from multissl.cli import run_recipe

    run_recipe(main)
