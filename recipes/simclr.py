"""SimCLR image pretraining (two augmented views, NT-Xent) on any timm backbone.

python recipes/simclr.py [--config recipes/configs/simclr/tiny.yaml] [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from multissl import config
from multissl.image_ssl import ImageSSLSections, fit_image_ssl
from multissl.objectives.simclr import SimCLR, SimCLRLossConfig, SimCLRModelConfig
from multissl.training.config import TrainerConfig
from multissl.training.state import FitResult

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "simclr" / "tiny.yaml"


@dataclass
class SimCLRConfig(ImageSSLSections):
    model: SimCLRModelConfig = field(default_factory=SimCLRModelConfig)
    loss: SimCLRLossConfig = field(default_factory=SimCLRLossConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        output_dir="outputs/simclr", lr=1e-3, weight_decay=1e-6, warmup_ratio=0.05, max_grad_norm=0.0))


def main(argv: list[str] | None = None) -> FitResult:
    cfg = config.load(SimCLRConfig, argv, DEFAULT_CONFIG)
    return fit_image_ssl(cfg, lambda **kw: SimCLR(cfg.model, cfg.loss, **kw))


if __name__ == "__main__":
    from multissl.cli import run_recipe

    run_recipe(main)
