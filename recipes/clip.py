"""CLIP-style image–text contrastive pretraining on open_clip models.

python recipes/clip.py [--config recipes/configs/clip/tiny.yaml] [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multissl import config
from multissl.callbacks import recipe_trainer
from multissl.data.image_text import ImageTextCollator, ImageTextDataConfig, prepare_image_text
from multissl.hub import HubConfig
from multissl.objectives.clip import ClipEvalConfig, ClipLossConfig, ClipModelConfig, ClipPretraining
from multissl.probe import ProbeConfig
from multissl.training.config import TrainerConfig
from multissl.training.state import FitResult

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "clip" / "tiny.yaml"


@dataclass
class ClipConfig:
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    data: ImageTextDataConfig = field(default_factory=ImageTextDataConfig)
    loss: ClipLossConfig = field(default_factory=ClipLossConfig)
    eval: ClipEvalConfig = field(default_factory=ClipEvalConfig)
    # open_clip_train's defaults: AdamW betas (0.9, 0.98), eps 1e-6, weight decay 0.2, cosine with warm-up
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        output_dir="outputs/clip", lr=5e-4, adam_betas=(0.9, 0.98), adam_eps=1e-6, weight_decay=0.2,
        lr_schedule="cosine", warmup_ratio=0.05, batch_size=256))
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    hub: HubConfig = field(default_factory=HubConfig)


def main(argv: list[str] | None = None) -> FitResult:
    cfg = config.load(ClipConfig, argv, DEFAULT_CONFIG)
    trainer = recipe_trainer(cfg)
    with trainer.main_process_first():
        train, held_out = prepare_image_text(cfg.data, cfg.trainer.seed)

    def make_collator(transform: Any, tokenizer: Any, sample_caption: bool) -> ImageTextCollator:
        return ImageTextCollator(transform, tokenizer, on_bad_image=cfg.data.on_bad_image,
                                 max_image_pixels=cfg.data.max_image_pixels, sample_caption=sample_caption)

    objective = ClipPretraining(cfg.model, cfg.loss, cfg.eval, make_collator)
    objective.eval_data = held_out
    return trainer.fit(objective, train, held_out)


if __name__ == "__main__":
    from multissl.cli import run_recipe

    run_recipe(main)
