"""MLM masking statistics, special tokens, whole words; padding helper."""

from __future__ import annotations

import pytest
import torch

from multissl.data.masking import mask_tokens, pad_blocks, word_start_table

VOCAB, MASK = 1000, 4


def _batch(n: int = 64, length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(10, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    ids[:, 0], ids[:, -1] = 2, 3  # specials at the ends
    maskable[:, 0] = maskable[:, -1] = False
    ids[:8, -40:] = 0  # padding in some rows
    maskable[:8, -40:] = False
    return ids, maskable


def test_rates_match_bert_recipe() -> None:
    ids, maskable = _batch()
    inputs, labels = mask_tokens(ids, maskable, torch.Generator().manual_seed(1), mask_id=MASK, vocab_size=VOCAB)
    selected = labels != -100
    rate = selected.sum() / maskable.sum()
    assert rate.item() == pytest.approx(0.15, abs=0.01)
    assert not selected[~maskable].any(), "specials and padding are never selected"
    assert torch.equal(labels[selected], ids[selected]), "labels hold the original tokens"
    as_mask = (inputs == MASK) & selected
    kept = (inputs == ids) & selected
    changed = selected & ~as_mask & ~kept
    n = selected.sum().item()
    assert as_mask.sum().item() / n == pytest.approx(0.8, abs=0.03)
    # random replacements that happen to draw the original token count as kept (1/VOCAB of them)
    assert changed.sum().item() / n == pytest.approx(0.1, abs=0.02)
    assert kept.sum().item() / n == pytest.approx(0.1, abs=0.02)
    assert torch.equal(inputs[~selected], ids[~selected]), "unselected tokens are untouched"


def test_same_seed_same_masks_other_seed_differs() -> None:
    ids, maskable = _batch()
    a = mask_tokens(ids, maskable, torch.Generator().manual_seed(5), mask_id=MASK, vocab_size=VOCAB)
    b = mask_tokens(ids, maskable, torch.Generator().manual_seed(5), mask_id=MASK, vocab_size=VOCAB)
    c = mask_tokens(ids, maskable, torch.Generator().manual_seed(6), mask_id=MASK, vocab_size=VOCAB)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_whole_word_masks_all_pieces_together() -> None:
    ids, maskable = _batch(32, 200)
    gen = torch.Generator().manual_seed(3)
    starts = torch.rand(ids.shape, generator=gen) < 0.4  # words of 1-several pieces
    starts[:, :2] = True
    _, labels = mask_tokens(ids, maskable, torch.Generator().manual_seed(2), mask_id=MASK, vocab_size=VOCAB,
                            word_starts=starts)
    selected = labels != -100
    word_id = starts.long().cumsum(1)
    for row in range(ids.shape[0]):
        for w in word_id[row].unique():
            pieces = (word_id[row] == w) & maskable[row]
            if pieces.any():
                sel = selected[row][pieces]
                assert sel.all() or not sel.any(), "a word is masked whole or not at all"
    assert selected.sum() / maskable.sum() == pytest.approx(0.15, abs=0.03)


def test_word_start_table_for_wordpiece_and_bpe() -> None:
    from multissl.data.text import train_tokenizer

    texts = ["unbelievable tokenization happens everywhere"] * 50 + ["the cat sat on the mat"] * 50
    wp = train_tokenizer(texts, "mlm", 120, 64, lowercase=True)
    table = word_start_table(wp)
    for tok, i in wp.get_vocab().items():
        assert bool(table[i]) == (not tok.startswith("##"))
    bpe = train_tokenizer(texts, "clm", 300, 64, lowercase=False)
    t2 = word_start_table(bpe)
    ids = bpe(" the cat", add_special_tokens=False)["input_ids"]
    assert bool(t2[ids[0]])


def test_pad_blocks() -> None:
    ids, mask = pad_blocks([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
