"""VICReg image pretraining (variance-invariance-covariance) on any timm backbone.

python recipes/vicreg.py [--config recipes/configs/vicreg/tiny.yaml] [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from multissl import config
from multissl.data.views import AugmentConfig
from multissl.image_ssl import ImageSSLSections, fit_image_ssl
from multissl.objectives.barlow_twins import RedundancyModelConfig
from multissl.objectives.vicreg import VICReg, VICRegLossConfig
from multissl.training.config import TrainerConfig
from multissl.training.state import FitResult

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "vicreg" / "tiny.yaml"


@dataclass
class VICRegConfig(ImageSSLSections):
    model: RedundancyModelConfig = field(default_factory=RedundancyModelConfig)
    loss: VICRegLossConfig = field(default_factory=VICRegLossConfig)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(
        blur=0.5, solarize=0.1))
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        output_dir="outputs/vicreg", optimizer="lars", lr=0.2, weight_decay=1e-6, warmup_ratio=0.01,
        max_grad_norm=0.0))
    """The paper's LARS (base lr 0.2 x batch/256), warm-up then cosine."""


def main(argv: list[str] | None = None) -> FitResult:
    cfg = config.load(VICRegConfig, argv, DEFAULT_CONFIG)
    return fit_image_ssl(cfg, lambda **kw: VICReg(cfg.model, cfg.loss, **kw))


if __name__ == "__main__":
    from multissl.cli import run_recipe

    run_recipe(main)
