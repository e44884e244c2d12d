"""Fine-tune a wav2vec 2.0 model (the wav2vec2 recipe's output, or any transformers folder or Hub id)
for speech recognition with a CTC head over the characters of the training transcripts.

python recipes/finetune_speech_recognition.py [--config recipes/configs/finetune_speech_recognition/tiny.yaml]
    model.init_from=outputs/wav2vec2-tiny [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from multissl import config
from multissl.callbacks import recipe_trainer
from multissl.data.audio_tasks import prepare_labelled_audio
from multissl.data.speech_demo import default_speech_corpus
from multissl.hub import HubConfig
from multissl.objectives.ctc import (
    CTCModelConfig,
    SpeechRecognition,
    SpeechRecognitionDataConfig,
    build_ctc_model,
    make_processor,
    prepare_transcripts,
)
from multissl.probe import ProbeConfig
from multissl.training.config import TrainerConfig
from multissl.training.state import FitResult

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "finetune_speech_recognition" / "tiny.yaml"


@dataclass
class SpeechRecognitionConfig:
    model: CTCModelConfig = field(default_factory=CTCModelConfig)
    data: SpeechRecognitionDataConfig = field(default_factory=SpeechRecognitionDataConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        output_dir="outputs/speech-recognition", lr=1e-4, warmup_ratio=0.1, lr_schedule="linear", epochs=30))
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    hub: HubConfig = field(default_factory=HubConfig)


def main(argv: list[str] | None = None) -> FitResult:
    cfg = config.load(SpeechRecognitionConfig, argv, DEFAULT_CONFIG)
    trainer = recipe_trainer(cfg)
    with trainer.main_process_first():
        train, held_out, source = prepare_labelled_audio(cfg.data, "transcript", default_speech_corpus,
                                                      output_dir=cfg.trainer.output_dir)
        train, held_out, vocab = prepare_transcripts(train, held_out, cfg.data, source)
    trainer.print(f"{source}: {len(train)} training and {len(held_out)} eval utterances; "
                  f"{len(vocab)} CTC symbols ({''.join(c for c in vocab if len(c) == 1)})")
    model, base = build_ctc_model(cfg.model, vocab)
    objective = SpeechRecognition(model, make_processor(vocab, cfg.data, model.config), train.collator(),
                                  "" if cfg.model.random_init else base)
    return trainer.fit(objective, train, held_out)


if __name__ == "__main__":
    from multissl.cli import run_recipe

    run_recipe(main)
