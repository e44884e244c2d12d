"""Causal (next-token) language modelling pretraining, GPT-2 or Llama-style.

python recipes/clm.py [--config recipes/configs/clm/tiny.yaml] [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from multissl import config
from multissl.callbacks import recipe_trainer
from multissl.data.text import TextDataConfig, prepare_text
from multissl.hub import HubConfig
from multissl.objectives.clm import CausalLM
from multissl.objectives.language_model import TextModelConfig
from multissl.probe import ProbeConfig
from multissl.training.config import TrainerConfig
from multissl.training.state import FitResult

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "clm" / "tiny.yaml"


@dataclass
class SamplingConfig:
    """Greedy continuations logged at every evaluation."""

    prompts: list[str] = field(default_factory=lambda: ["The return statement", "A class definition"])
    max_new_tokens: int = 24


@dataclass
class CLMConfig:
    model: TextModelConfig = field(default_factory=lambda: TextModelConfig(arch="gpt2"))
    data: TextDataConfig = field(default_factory=TextDataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(output_dir="outputs/clm"))
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    hub: HubConfig = field(default_factory=HubConfig)


def main(argv: list[str] | None = None) -> FitResult:
    cfg = config.load(CLMConfig, argv, DEFAULT_CONFIG)
    trainer = recipe_trainer(cfg)
    data = prepare_text(cfg.data, "clm", cfg.trainer.output_dir, cfg.trainer.seed, trainer)
    objective = CausalLM(cfg.model, data.tokenizer, cfg.data.max_seq_len,
                         cfg.sampling.prompts, cfg.sampling.max_new_tokens)
    return trainer.fit(objective, data.train, data.eval)


if __name__ == "__main__":
    from multissl.cli import run_recipe

    run_recipe(main)
