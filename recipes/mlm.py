"""Masked language modelling (BERT/RoBERTa-style) pretraining.

python recipes/mlm.py [--config recipes/configs/mlm/tiny.yaml] [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from multissl import config
from multissl.callbacks import recipe_trainer
from multissl.data.text import TextDataConfig, prepare_text
from multissl.hub import HubConfig
from multissl.objectives.language_model import TextModelConfig
from multissl.objectives.mlm import MaskedLM, MaskingConfig
from multissl.probe import ProbeConfig
from multissl.training.config import TrainerConfig
from multissl.training.state import FitResult

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "mlm" / "tiny.yaml"


@dataclass
class MLMConfig:
    model: TextModelConfig = field(default_factory=lambda: TextModelConfig(arch="bert"))
    data: TextDataConfig = field(default_factory=TextDataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(output_dir="outputs/mlm"))
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    hub: HubConfig = field(default_factory=HubConfig)


def main(argv: list[str] | None = None) -> FitResult:
    cfg = config.load(MLMConfig, argv, DEFAULT_CONFIG)
    trainer = recipe_trainer(cfg)
    # BERT uses WordPiece, RoBERTa byte-level BPE (when no tokenizer is given, one is trained)
    algorithm = "wordpiece" if cfg.model.arch == "bert" else "bytelevel"
    data = prepare_text(cfg.data, "mlm", cfg.trainer.output_dir, cfg.trainer.seed, trainer, algorithm)
    objective = MaskedLM(cfg.model, cfg.masking, data.tokenizer, cfg.data.max_seq_len)
    return trainer.fit(objective, data.train, data.eval)


if __name__ == "__main__":
    from multissl.cli import run_recipe

    run_recipe(main)
