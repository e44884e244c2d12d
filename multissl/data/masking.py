"""Batch padding and BERT-style token masking, vectorised, drawing randomness from a generator."""

from __future__ import annotations

from typing import Any

import torch


def pad_blocks(samples: list[dict[str, Any]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` lists -> ``(ids, attention_mask)`` right-padded to the longest in the batch."""
    seqs = [s["input_ids"] for s in samples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def word_start_table(tokenizer: Any) -> torch.Tensor:
    """Boolean per vocabulary id: does this token start a word? (for whole-word masking)

    WordPiece marks continuations with ``##``; byte-level BPE marks word starts with ``Ġ``
    (a leading space); SentencePiece with ``▁``.
    """
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    table = torch.ones(size, dtype=torch.bool)
    tokens = list(vocab.items())
    if any(t.startswith("##") for t, _ in tokens):
        for t, i in tokens:
            table[i] = not t.startswith("##")
    elif any(t.startswith("Ġ") for t, _ in tokens) or any(t.startswith("▁") for t, _ in tokens):
        specials = set(tokenizer.all_special_tokens)
        for t, i in tokens:
            table[i] = t.startswith(("Ġ", "▁")) or t in specials or not t[:1].isalnum()
    return table


def mask_tokens(
    ids: torch.Tensor,
    maskable: torch.Tensor,
    generator: torch.Generator,
    *,
    mask_id: int,
    vocab_size: int,
    mask_prob: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
    word_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select ``mask_prob`` of the maskable positions; replace 80% with [MASK], 10% with a random
    token, keep 10%. Returns ``(inputs, labels)`` with labels -100 where nothing is predicted.

    With ``word_starts`` (bool, same shape as ids) whole words are selected: each word draws once
    and all its pieces follow that draw.
    """
    draw = torch.rand(ids.shape, generator=generator)
    if word_starts is not None:
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        start_of_word = torch.where(word_starts, positions, torch.zeros_like(positions)).cummax(dim=1).values
        draw = draw.gather(1, start_of_word)
    selected = (draw < mask_prob) & maskable
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    how = torch.rand(ids.shape, generator=generator)
    to_mask = selected & (how < mask_frac)
    to_random = selected & (how >= mask_frac) & (how < mask_frac + random_frac)
    inputs = ids.clone()
    inputs[to_mask] = mask_id
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    inputs[to_random] = random_ids[to_random]
    return inputs, labels
