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


def test_chunked_next_token_loss_equals_the_causal_lm_s_own_loss_and_gradients(monkeypatch) -> None:
    from multissl.losses import linear_cross_entropy as lce
    from multissl.objectives.clm import CausalLM

    monkeypatch.setattr(lce, "_chunk_rows", lambda vocab, device: 7)  # several chunks, one cut mid-row-block
    for arch in ("gpt2", "llama"):
        tok = train_tokenizer(TEXTS, "clm", 200, 32, lowercase=False, algorithm="bytelevel")
        torch.manual_seed(0)
        obj = CausalLM(TextModelConfig(arch=arch, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                       dropout=0.0), tok, 32)
        samples = [{"input_ids": tok(t, truncation=True, max_length=32)["input_ids"]} for t in TEXTS[17:23]]
        batch = obj.collator()(samples, torch.Generator())
        assert (batch["attention_mask"] == 0).any(), "padding, so ignored positions are part of the check"
        lm = obj.export(obj.model)
        ours = obj.compute(obj.model, batch)
        ours["loss"].value.backward()
        mine = {n: p.grad.clone() for n, p in lm.named_parameters()}
        lm.zero_grad()
        full = lm(**batch)
        full.loss.backward()
        torch.testing.assert_close(ours["loss"].value, full.loss)
        target = batch["labels"][:, 1:]
        valid = target != -100
        acc = (full.logits[:, :-1].argmax(-1)[valid] == target[valid]).float().mean()
        torch.testing.assert_close(ours["next_token_accuracy"].value, acc)
        for name, p in lm.named_parameters():
            torch.testing.assert_close(mine[name], p.grad, rtol=1e-4, atol=1e-6, msg=f"{arch} {name}")
