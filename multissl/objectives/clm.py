"""Causal language modelling (GPT-2/Llama): predict each next token."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from multissl.data.masking import pad_blocks
from multissl.errors import ConfigError
from multissl.losses.linear_cross_entropy import linear_cross_entropy
from multissl.metrics import Mean
from multissl.objectives.language_model import LanguageModelObjective, TextModelConfig, build_model
from multissl.training.objective import ModelCardInfo


@dataclass
class CausalCollator:
    """Pads packed blocks; labels are the inputs (the model shifts them), padding ignored."""

    pad_id: int

    def __call__(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids, attention = pad_blocks(samples, self.pad_id)
        labels = ids.masked_fill(attention == 0, -100)
        return {"input_ids": ids, "attention_mask": attention, "labels": labels}


class NextTokenLoss(nn.Module):
    """Runs a transformers ``*ForCausalLM`` body and takes the next-token loss through its output
    projection with `linear_cross_entropy`, never making the (tokens x vocabulary) logits: for a
    small model those logits, their softmax and gradient are the largest tensors of a step. The
    loss equals the model's own (a test checks it); the wrapped model is what gets saved."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        head = lm.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"{type(lm).__name__}: its output embeddings are not a linear layer")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(summed loss, correct predictions)`` over the positions whose next label is not -100."""
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        head = self.lm.get_output_embeddings()
        return linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:], head.bias)


class CausalLM(LanguageModelObjective):
    name = "clm"
    pipeline_tag = "text-generation"

    def __init__(self, model_cfg: TextModelConfig, tokenizer: Any, max_seq_len: int,
                 sample_prompts: list[str] | None = None, sample_tokens: int = 24) -> None:
        from transformers import AutoModelForCausalLM

        if model_cfg.arch not in ("gpt2", "llama"):
            raise ConfigError(f"model.arch={model_cfg.arch!r} is not a causal LM; use gpt2 or llama")
        lm = build_model(model_cfg, tokenizer, max_seq_len, AutoModelForCausalLM)
        super().__init__(NextTokenLoss(lm), tokenizer, model_cfg.arch, model_cfg.size)
        self.sample_prompts = sample_prompts or []
        self.sample_tokens = sample_tokens
        self.max_seq_len = max_seq_len
        gen = lm.generation_config
        gen.pad_token_id, gen.eos_token_id = self.pad_id, tokenizer.eos_token_id

    def collator(self) -> CausalCollator:
        return CausalCollator(self.pad_id)

    def compute(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        loss, correct = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        n = (batch["labels"][:, 1:] != -100).sum()
        return {"loss": Mean(loss, n), "next_token_accuracy": Mean(correct.float(), n)}

    def export(self, model: nn.Module) -> nn.Module:
        return model.lm if isinstance(model, NextTokenLoss) else model

    @torch.no_grad()
    def on_evaluate(self, model: Any) -> dict[str, Any]:
        """Greedy continuations of a few fixed prompts, so progress can be read, not only plotted."""
        if not self.sample_prompts:
            return {}
        device = next(model.parameters()).device
        samples = []
        for prompt in self.sample_prompts:
            enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
            room = self.max_seq_len - enc["input_ids"].shape[1]  # never past the learned positions
            if room <= 0:
                continue
            out = model.generate(**enc, max_new_tokens=min(self.sample_tokens, room), do_sample=False)
            samples.append(self.tokenizer.decode(out[0], skip_special_tokens=True))
        return {"samples": samples}

    def model_card(self) -> ModelCardInfo:
        usage = (
            "from transformers import pipeline\n\n"
            'generate = pipeline("text-generation", model="{repo}")\n'
            'print(generate("The return statement", max_new_tokens=30)[0]["generated_text"])'
        )
        return replace(super().model_card(), usage=usage, auto_class="AutoModelForCausalLM")
