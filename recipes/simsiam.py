"""SimSiam image pretraining (predictor + stop-gradient, no negatives, no EMA) on any timm backbone.

python recipes/simsiam.py [--config recipes/configs/simsiam/tiny.yaml] [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from multissl import config
from multissl.image_ssl import ImageSSLSections, fit_image_ssl
from multissl.objectives.byol import SimSiam, SimSiamModelConfig
from multissl.training.config import TrainerConfig
from multissl.training.state import FitResult

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "simsiam" / "tiny.yaml"


@dataclass
class SimSiamConfig(ImageSSLSections):
    model: SimSiamModelConfig = field(default_factory=SimSiamModelConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        output_dir="outputs/simsiam", optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, warmup_ratio=0.0,
        max_grad_norm=0.0))
    """The paper's SGD at 0.05 x batch/256, cosine, the predictor at a fixed lr."""


def main(argv: list[str] | None = None) -> FitResult:
    cfg = config.load(SimSiamConfig, argv, DEFAULT_CONFIG)
    return fit_image_ssl(cfg, lambda **kw: SimSiam(cfg.model, **kw))


if __name__ == "__main__":
    from multissl.cli import run_recipe

    run_recipe(main)
