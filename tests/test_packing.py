"""Packing keeps every token and fills blocks."""

from __future__ import annotations

import random

import pytest

from multissl.data.text import PACK_BATCH, TextDataConfig, pack_ids, tokenize_and_pack, train_tokenizer


@pytest.mark.parametrize("block", [1, 7, 64])
def test_pack_ids_keeps_every_token(block: int) -> None:
    rng = random.Random(block)
    docs = [[rng.randrange(5, 100) for _ in range(rng.randrange(0, 50))] for _ in range(40)]
    blocks = pack_ids(docs, block, sep=1)
    flat = [t for b in blocks for t in b]
    expected = [t for d in docs for t in (*d, 1)]
    assert flat == expected
    assert all(len(b) == block for b in blocks[:-1]) and 0 < len(blocks[-1]) <= block


def _corpus(n: int) -> list[str]:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda"]
    return [" ".join(rng.choice(words) for _ in range(rng.randrange(1, 40))) for _ in range(n)]


@pytest.mark.parametrize("kind", ["mlm", "clm"])
def test_tokenize_and_pack_dataset(kind: str) -> None:
    from datasets import Dataset

    texts = _corpus(2500)
    cfg = TextDataConfig(max_seq_len=32)
    tok = train_tokenizer(texts, kind, 200, 32, lowercase=False)
    packed = tokenize_and_pack(Dataset.from_dict({"text": texts}), tok, kind, cfg)
    lengths = [len(x) for x in packed["input_ids"]]
    short = [n for n in lengths if n != 32]
    assert len(short) <= -(-len(texts) // PACK_BATCH), "at most one short block per map batch"
    padding = sum(32 - n for n in lengths) / (32 * len(lengths))
    assert padding < 0.01
    sep = tok.sep_token_id if kind == "mlm" else tok.eos_token_id
    body = [t for b in packed["input_ids"] for t in (b[1:-1] if kind == "mlm" else b)]
    expected = [t for ids in tok(texts, add_special_tokens=False)["input_ids"] for t in (*ids, sep)]
    assert body == expected, "no token lost or reordered"
    if kind == "mlm":
        assert all(b[0] == tok.cls_token_id and b[-1] == tok.sep_token_id for b in packed["input_ids"])


def test_packing_is_cached_between_runs(tmp_path) -> None:
    """A second preparation of the same files with the same tokenizer reuses datasets' cache."""
    import json

    from multissl.data.text import prepare_text

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in _corpus(300)))
    cfg = TextDataConfig(files=[str(corpus)], max_seq_len=32, vocab_size=200, num_proc=2)
    first = prepare_text(cfg, "clm", tmp_path / "run", seed=0)
    again = prepare_text(cfg, "clm", tmp_path / "run", seed=0)  # tokenizer now loaded from disk
    assert first.train.cache_files and first.train.cache_files == again.train.cache_files
    assert list(first.train["input_ids"]) == list(again.train["input_ids"])
