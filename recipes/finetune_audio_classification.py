"""Fine-tune a wav2vec 2.0 output (or train from scratch) to classify clips, e.g. spot keywords.

python recipes/finetune_audio_classification.py model.init_from=outputs/wav2vec2-tiny [key=value ...]
    [--config recipes/configs/finetune_audio_classification/tiny.yaml]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from multissl import config
from multissl.callbacks import recipe_trainer
from multissl.data.audio_tasks import LabelledAudioDataConfig
from multissl.data.keyword_demo import default_keyword_corpus
from multissl.hub import HubConfig
from multissl.objectives.audio_classification import (
    AudioClassification,
    AudioClassifierModelConfig,
    build_audio_classifier,
    feature_extractor_for,
    label_splits,
)
from multissl.probe import ProbeConfig
from multissl.training.config import TrainerConfig
from multissl.training.state import FitResult

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "finetune_audio_classification" / "tiny.yaml"


@dataclass
class AudioClassificationConfig:
    model: AudioClassifierModelConfig = field(default_factory=AudioClassifierModelConfig)
    # Keyword clips last about a second: keep clips down to 0.25 s; hold out whole speakers.
    data: LabelledAudioDataConfig = field(default_factory=lambda: LabelledAudioDataConfig(
        min_seconds=0.25, validation_fraction=0.15))
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        output_dir="outputs/audio-classification", lr=1e-4, warmup_ratio=0.1, lr_schedule="linear",
        epochs=10))
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    hub: HubConfig = field(default_factory=HubConfig)


def main(argv: list[str] | None = None) -> FitResult:
    cfg = config.load(AudioClassificationConfig, argv, DEFAULT_CONFIG)
    trainer = recipe_trainer(cfg)
    with trainer.main_process_first():
        train, held_out, labels, source = label_splits(cfg.data, default_keyword_corpus, cfg.trainer.output_dir)
    trainer.print(f"{source}: {len(train)} training and {len(held_out)} eval clips, "
                  f"{labels.num_labels} labels ({', '.join(labels.names)})")
    model, base = build_audio_classifier(cfg.model, labels)
    extractor = feature_extractor_for(model.config, cfg.data.sample_rate, cfg.data.normalize, base)
    base_model = "" if cfg.model.random_init else base
    objective = AudioClassification(model, labels, train.collator(), extractor, base_model)
    return trainer.fit(objective, train, held_out)


if __name__ == "__main__":
    from multissl.cli import run_recipe

    run_recipe(main)
