"""Objective internals checked against the transformers models they wrap."""

from __future__ import annotations

import torch

from multissl.data.text import train_tokenizer
from multissl.objectives.language_model import TextModelConfig
from multissl.objectives.mlm import MaskedLM, MaskingConfig

TEXTS = ["the quick brown fox jumps over the lazy dog"] * 20 + ["a stitch in time saves nine"] * 20


def test_masked_positions_only_equals_full_mlm_loss() -> None:
    for arch, algo in (("bert", "wordpiece"), ("roberta", "bytelevel")):
        tok = train_tokenizer(TEXTS, "mlm", 200, 32, lowercase=False, algorithm=algo)
        torch.manual_seed(0)
        obj = MaskedLM(TextModelConfig(arch=arch, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                       dropout=0.0), MaskingConfig(mask_prob=0.3), tok, 32)
        samples = [{"input_ids": tok(t, truncation=True, max_length=32)["input_ids"]} for t in TEXTS[18:24]]
        batch = obj.collator()(samples, torch.Generator().manual_seed(1))
        assert (batch["labels"] != -100).sum() > 0
        obj.model.eval()
        with torch.no_grad():
            ours = obj.compute(obj.model, batch)
            full = obj.export(obj.model)(**batch)
        torch.testing.assert_close(ours["loss"].value, full.loss)
        target = batch["labels"] != -100
        acc = (full.logits.argmax(-1)[target] == batch["labels"][target]).float().mean()
        torch.testing.assert_close(ours["masked_accuracy"].value, acc)
