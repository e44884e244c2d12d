"""wav2vec 2.0-style contrastive audio pretraining.

python recipes/wav2vec2.py [--config recipes/configs/wav2vec2/tiny.yaml] [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from multissl import config
from multissl.callbacks import recipe_trainer
from multissl.data.audio import AudioDataConfig
from multissl.data.audio_splits import prepare_audio
from multissl.hub import HubConfig
from multissl.objectives.wav2vec2 import Wav2Vec2LossConfig, Wav2Vec2ModelConfig, Wav2Vec2Pretraining
from multissl.probe import ProbeConfig
from multissl.training.config import TrainerConfig
from multissl.training.state import FitResult

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "wav2vec2" / "tiny.yaml"


@dataclass
class Wav2Vec2Config:
    model: Wav2Vec2ModelConfig = field(default_factory=Wav2Vec2ModelConfig)
    data: AudioDataConfig = field(default_factory=AudioDataConfig)
    loss: Wav2Vec2LossConfig = field(default_factory=Wav2Vec2LossConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        output_dir="outputs/wav2vec2", lr=5e-4, adam_betas=(0.9, 0.98), adam_eps=1e-6, lr_schedule="linear",
        warmup_ratio=0.08, max_grad_norm=10.0))
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    hub: HubConfig = field(default_factory=HubConfig)


def main(argv: list[str] | None = None) -> FitResult:
    cfg = config.load(Wav2Vec2Config, argv, DEFAULT_CONFIG)
    trainer = recipe_trainer(cfg)
    with trainer.main_process_first():
        train, held_out = prepare_audio(cfg.data, cfg.trainer.seed, cfg.trainer.output_dir)
    objective = Wav2Vec2Pretraining(cfg.model, cfg.loss, train.collator())
    return trainer.fit(objective, train, held_out)


if __name__ == "__main__":
    from multissl.cli import run_recipe

    run_recipe(main)
