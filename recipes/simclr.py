"""SimCLR image pretraining (two augmented views, NT-Xent) on any timm backbone.

python recipes/simclr.py [--config recipes/configs/simclr/tiny.yaml] [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from multissl import config
from multissl.callbacks import recipe_trainer
from multissl.data.image_data import ImageDataConfig, prepare_images
from multissl.data.views import AugmentConfig
from multissl.hub import HubConfig
from multissl.objectives.simclr import SimCLR, SimCLRLossConfig, SimCLRModelConfig
from multissl.probe import ProbeConfig
from multissl.training.config import TrainerConfig
from multissl.training.state import FitResult

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "simclr" / "tiny.yaml"


@dataclass
class SimCLRConfig:
    model: SimCLRModelConfig = field(default_factory=SimCLRModelConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: SimCLRLossConfig = field(default_factory=SimCLRLossConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        output_dir="outputs/simclr", lr=1e-3, weight_decay=1e-6, warmup_ratio=0.05, max_grad_norm=0.0))
    probe: ProbeConfig = field(default_factory=lambda: ProbeConfig(task="digits"))
    """The online kNN and linear probe at every evaluation (embedded digits; ``probe.task=""`` = off)."""
    hub: HubConfig = field(default_factory=HubConfig)


def main(argv: list[str] | None = None) -> FitResult:
    cfg = config.load(SimCLRConfig, argv, DEFAULT_CONFIG)
    trainer = recipe_trainer(cfg)
    with trainer.main_process_first():
        train, held_out = prepare_images(cfg.data)
    trainer.print(f"{train.source}: {len(train)} training and {len(held_out) if held_out else 0} held-out images")
    objective = SimCLR(cfg.model, cfg.loss, cfg.augment, cfg.data.on_bad_image, cfg.data.max_image_pixels)
    return trainer.fit(objective, train, held_out)


if __name__ == "__main__":
    from multissl.cli import run_recipe

    run_recipe(main)
