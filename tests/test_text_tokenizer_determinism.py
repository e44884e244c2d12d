"""A trained tokenizer is the same in every process for the same corpus (issue 15).

`tokenizers`' WordPiece trainer numbers its ``##x`` pieces in hash-map order, seeded afresh in each
process (not by PYTHONHASHSEED), and breaks merge ties by those numbers: two trainings differed in
the ids of ~80% of the tokens and in ~2% of the tokens themselves before `train_tokenizer` pinned
them. Each training therefore runs in its own process, with different hash seeds and thread counts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import run

TRAIN = """
import sys
from multissl.data.demo import python_doc_paragraphs
from multissl.data.text import train_tokenizer

texts = [row["text"] for row in python_doc_paragraphs()[:150]]
for kind, algorithm in (("mlm", "wordpiece"), ("clm", "bytelevel")):
    tok = train_tokenizer(iter(texts), kind, 400, 64, True, algorithm)
    tok.save_pretrained(f"{sys.argv[1]}/{algorithm}")
"""
ENVS = [
    {"PYTHONHASHSEED": "1", "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
    {"PYTHONHASHSEED": "2", "RAYON_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "true"},
]


def _vocab(folder: Path) -> dict[str, int]:
    """The token -> id map of a saved fast tokenizer."""
    return json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The same corpus trained in two processes."""
    outs = []
    for i, env in enumerate(ENVS):
        out = tmp_path_factory.mktemp(f"tok{i}")
        proc = run([sys.executable, "-c", TRAIN, str(out)], timeout=120, **env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(out)
    return outs


@pytest.mark.parametrize("algorithm", ["wordpiece", "bytelevel"])
def test_two_processes_train_the_same_vocab(trained: list[Path], algorithm: str) -> None:
    first, second = (_vocab(out / algorithm) for out in trained)
    assert len(first) == 400
    moved = sorted(t for t in first if second.get(t) != first[t])
    assert not moved, f"{len(moved)} of {len(first)} tokens differ in id or presence, e.g. {moved[:8]}"


def test_wordpiece_keeps_only_its_specials(trained: list[Path]) -> None:
    """The pinned characters are ordinary vocabulary, not added tokens that would split words."""
    state = json.loads((trained[0] / "wordpiece" / "tokenizer.json").read_text())
    assert [t["content"] for t in state["added_tokens"]] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = state["model"]["vocab"]
    assert {"e", "##e"} <= set(vocab) and vocab["[MASK]"] == 4
