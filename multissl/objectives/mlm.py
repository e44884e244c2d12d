"""Masked language modelling (BERT/RoBERTa): predict 15% of tokens from their context."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from multissl.data.masking import mask_tokens, pad_blocks, word_start_table
from multissl.errors import ConfigError
from multissl.metrics import Mean
from multissl.objectives.language_model import LanguageModelObjective, TextModelConfig, build_model
from multissl.training.objective import ModelCardInfo


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


class MaskedPositionsOnly(nn.Module):
    """Runs a transformers ``*ForMaskedLM`` but applies its LM head only at masked positions.

    The vocabulary projection is most of a small encoder's compute (vocab x hidden per token);
    BERT predicts ~15% of tokens, so projecting only those cuts a training step's FLOPs by up to
    half with the same loss. The wrapped model is what gets saved.
    """

    def __init__(self, mlm: nn.Module) -> None:
        super().__init__()
        self.mlm = mlm
        head = getattr(mlm, "cls", None) or getattr(mlm, "lm_head", None)
        if head is None:
            raise ConfigError(f"{type(mlm).__name__}: no `cls`/`lm_head` module to apply at masked positions")
        self.head_name = "cls" if getattr(mlm, "cls", None) is not None else "lm_head"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.mlm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        target = labels != -100
        logits = getattr(self.mlm, self.head_name)(hidden[target])
        loss = nn.functional.cross_entropy(logits.float(), labels[target])
        return loss, logits, labels[target]


@dataclass
class MaskingCollator:
    """Pads packed blocks and masks them (80/10/10 of ``mask_prob``) with the batch's generator."""

    masking: MaskingConfig
    pad_id: int
    mask_id: int
    vocab_size: int
    special_ids: torch.Tensor
    word_starts: torch.Tensor | None = None
    """Whole-word masking: token id -> whether it starts a word."""

    def __call__(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids, attention = pad_blocks(samples, self.pad_id)
        maskable = ~torch.isin(ids, self.special_ids) & attention.bool()
        m = self.masking
        inputs, labels = mask_tokens(
            ids, maskable, generator, mask_id=self.mask_id, vocab_size=self.vocab_size,
            mask_prob=m.mask_prob, mask_frac=m.mask_token_frac, random_frac=m.random_token_frac,
            word_starts=self.word_starts[ids] if self.word_starts is not None else None,
        )
        return {"input_ids": inputs, "attention_mask": attention, "labels": labels}


class MaskedLM(LanguageModelObjective):
    name = "mlm"
    pipeline_tag = "fill-mask"

    def __init__(self, model_cfg: TextModelConfig, masking: MaskingConfig, tokenizer: Any, max_seq_len: int) -> None:
        from transformers import AutoModelForMaskedLM

        if model_cfg.arch not in ("bert", "roberta"):
            raise ConfigError(f"model.arch={model_cfg.arch!r} is not a masked LM; use bert or roberta")
        super().__init__(MaskedPositionsOnly(build_model(model_cfg, tokenizer, max_seq_len, AutoModelForMaskedLM)),
                         tokenizer, model_cfg.arch, model_cfg.size)
        self._collator = MaskingCollator(
            masking, self.pad_id, tokenizer.mask_token_id, len(tokenizer),
            torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long),
            word_start_table(tokenizer) if masking.whole_word else None)

    def collator(self) -> MaskingCollator:
        return self._collator

    def compute(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        loss, logits, targets = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        n = targets.numel()
        with torch.no_grad():
            correct = (logits.argmax(-1) == targets).sum().float()
        return {
            "loss": Mean(loss * n, n),
            "masked_accuracy": Mean(correct, n),
            "masked_fraction": Mean(torch.tensor(float(n)), batch["attention_mask"].sum().float()),
        }

    def export(self, model: nn.Module) -> nn.Module:
        return model.mlm if isinstance(model, MaskedPositionsOnly) else model

    def model_card(self) -> ModelCardInfo:
        mask = self.tokenizer.mask_token
        usage = (
            "from transformers import pipeline\n\n"
            f'fill = pipeline("fill-mask", model="{{repo}}")\n'
            f'print(fill("The {mask} statement raises an exception."))'
        )
        return replace(super().model_card(), usage=usage, auto_class="AutoModelForMaskedLM")
