"""MoCo v2/v3 image pretraining (momentum key encoder; v2 with a queue of keys) on any timm backbone.

python recipes/moco.py [--config recipes/configs/moco/tiny.yaml] [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from multissl import config
from multissl.image_ssl import ImageSSLSections, fit_image_ssl
from multissl.objectives.moco import MoCo, MoCoLossConfig, MoCoModelConfig
from multissl.training.config import TrainerConfig
from multissl.training.state import FitResult

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "moco" / "tiny.yaml"


@dataclass
class MoCoConfig(ImageSSLSections):
    model: MoCoModelConfig = field(default_factory=MoCoModelConfig)
    loss: MoCoLossConfig = field(default_factory=MoCoLossConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        output_dir="outputs/moco", optimizer="sgd", lr=0.03, momentum=0.9, weight_decay=1e-4, warmup_ratio=0.0,
        max_grad_norm=0.0))
    """MoCo v2's SGD (lr 0.03 x batch/256, cosine); v3 uses AdamW/LARS (see the presets)."""


def main(argv: list[str] | None = None) -> FitResult:
    cfg = config.load(MoCoConfig, argv, DEFAULT_CONFIG)
    return fit_image_ssl(cfg, lambda **kw: MoCo(cfg.model, cfg.loss, **kw))


if __name__ == "__main__":
    from multissl.cli import run_recipe

    run_recipe(main)
