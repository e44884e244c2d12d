"""Masked language modelling (BERT/RoBERTa): predict 15% of tokens from their context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from multissl.data.masking import mask_tokens, pad_blocks, word_start_table
from multissl.errors import ConfigError
from multissl.metrics import Mean
from multissl.objectives.language_model import LanguageModelObjective, TextModelConfig, build_model


@dataclass
class MaskingConfig:
    """BERT's recipe: of the selected tokens, 80% become [MASK], 10% a random token, 10% stay."""

    mask_prob: float = 0.15
    mask_token_frac: float = 0.8
    random_token_frac: float = 0.1
    whole_word: bool = False
    """Select whole words (all their word pieces together) instead of single tokens."""

    def __post_init__(self) -> None:
        if not 0 < self.mask_prob < 1:
            raise ConfigError(f"masking.mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.mask_token_frac < 0 or self.random_token_frac < 0 or self.mask_token_frac + self.random_token_frac > 1:
            raise ConfigError("masking.mask_token_frac + masking.random_token_frac must be within [0, 1]")


class MaskedLM(LanguageModelObjective):
    name = "mlm"
    pipeline_tag = "fill-mask"

    def __init__(self, model_cfg: TextModelConfig, masking: MaskingConfig, tokenizer: Any, max_seq_len: int) -> None:
        from transformers import AutoModelForMaskedLM

        if model_cfg.arch not in ("bert", "roberta"):
            raise ConfigError(f"model.arch={model_cfg.arch!r} is not a masked LM; use bert or roberta")
        super().__init__(build_model(model_cfg, tokenizer, max_seq_len, AutoModelForMaskedLM), tokenizer,
                         model_cfg.arch, model_cfg.size)
        self.masking = masking
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.word_starts = word_start_table(tokenizer) if masking.whole_word else None

    def collate(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids, attention = pad_blocks(samples, self.pad_id)
        maskable = ~torch.isin(ids, self.special_ids) & attention.bool()
        m = self.masking
        inputs, labels = mask_tokens(
            ids, maskable, generator, mask_id=self.mask_id, vocab_size=self.vocab_size,
            mask_prob=m.mask_prob, mask_frac=m.mask_token_frac, random_frac=m.random_token_frac,
            word_starts=self.word_starts[ids] if self.word_starts is not None else None,
        )
        return {"input_ids": inputs, "attention_mask": attention, "labels": labels}

    def compute(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        target = batch["labels"] != -100
        n = target.sum()
        with torch.no_grad():
            correct = (out.logits.argmax(-1)[target] == batch["labels"][target]).sum().float()
        return {
            "loss": Mean(out.loss * n, n),
            "masked_accuracy": Mean(correct, n),
            "masked_fraction": Mean(n.float(), batch["attention_mask"].sum().float()),
        }

    def model_card_info(self) -> dict[str, Any]:
        info = super().model_card_info()
        mask = self.tokenizer.mask_token
        info["usage"] = (
            "from transformers import pipeline\n\n"
            f'fill = pipeline("fill-mask", model="{{repo}}")\n'
            f'print(fill("The {mask} statement raises an exception."))'
        )
        info["auto_class"] = "AutoModelForMaskedLM"
        return info
