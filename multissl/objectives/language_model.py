"""Shared pieces of the text objectives: model configs by size, building, saving, metrics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from multissl.errors import ConfigError, first_line
from multissl.training.objective import ModelCardInfo, Objective

# hidden size, layers, attention heads, feed-forward size
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (128, 2, 2, 512),
    "small": (512, 4, 8, 2048),
    "base": (768, 12, 12, 3072),
}


@dataclass
class TextModelConfig:
    """A transformers architecture at a named size; any field set here overrides the size's value."""

    arch: Literal["bert", "roberta", "gpt2", "llama"] = "bert"
    size: Literal["tiny", "small", "base"] = "tiny"
    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    intermediate_size: int = 0
    dropout: float = 0.1
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    init_from: str = ""
    """Continue pretraining from a local save_pretrained folder or Hub id instead of random init."""

    def dims(self) -> tuple[int, int, int, int]:
        h, layers, heads, ffn = SIZES[self.size]
        h = self.hidden_size or h
        heads = self.num_heads or heads
        if h % heads:
            raise ConfigError(f"model.hidden_size ({h}) must be divisible by model.num_heads ({heads})")
        return h, self.num_layers or layers, heads, self.intermediate_size or ffn


def transformers_config(cfg: TextModelConfig, tokenizer: Any, max_seq_len: int) -> Any:
    """A transformers config for ``cfg`` with vocabulary and special ids from ``tokenizer``."""
    from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig

    h, layers, heads, ffn = cfg.dims()
    vocab = len(tokenizer)
    if cfg.arch == "bert":
        return BertConfig(
            vocab_size=vocab, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=ffn, max_position_embeddings=max_seq_len, hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout, pad_token_id=tokenizer.pad_token_id, type_vocab_size=2,
        )
    if cfg.arch == "roberta":
        pad = tokenizer.pad_token_id
        return RobertaConfig(  # positions start after the padding index
            vocab_size=vocab, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=ffn, max_position_embeddings=max_seq_len + pad + 1, hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout, pad_token_id=pad, type_vocab_size=1,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        )
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if cfg.arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_embd=h, n_layer=layers, n_head=heads, n_inner=ffn, n_positions=max_seq_len,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
        )
    return LlamaConfig(
        vocab_size=vocab, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=ffn, max_position_embeddings=max_seq_len,
        attention_dropout=cfg.dropout, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
        tie_word_embeddings=True,
    )


def build_model(cfg: TextModelConfig, tokenizer: Any, max_seq_len: int, auto_class: Any) -> Any:
    if cfg.init_from:
        try:
            model = auto_class.from_pretrained(cfg.init_from, attn_implementation=cfg.attn_implementation)
        except Exception as err:
            raise ConfigError(f"model.init_from={cfg.init_from!r}: cannot load ({first_line(err)})") from None
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        return model
    config = transformers_config(cfg, tokenizer, max_seq_len)
    return auto_class.from_config(config, attn_implementation=cfg.attn_implementation)


class LanguageModelObjective(Objective):
    """MLM and CLM share padding, token counting, perplexity and saving."""

    pipeline_tag = ""
    modality = "text"

    def __init__(self, model: Any, tokenizer: Any, arch: str, size: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.arch, self.size = arch, size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def count(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"samples": int(batch["input_ids"].shape[0]), "tokens": int(batch["attention_mask"].sum())}

    def summarize(self, metrics: dict[str, float]) -> dict[str, float]:
        if "loss" in metrics:
            metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
        return metrics

    def save_pretrained(self, model: Any, output_dir: Path) -> None:
        model.save_pretrained(output_dir)
        self.tokenizer.save_pretrained(output_dir)

    def features(self, model: nn.Module, inputs: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        from multissl.models.features import text_features

        return text_features(model, self.tokenizer, inputs, batch_size)

    def model_card(self) -> ModelCardInfo:
        return ModelCardInfo(
            method=self.name, arch=self.arch, size=self.size, library_name="transformers",
            pipeline_tag=self.pipeline_tag, card_metrics=("loss", "perplexity", "masked_accuracy", "next_token_accuracy"),
            parameters=sum(p.numel() for p in self.model.parameters()),
        )
