"""Text sources through `datasets`, and bad input that must fail with one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multissl.data.text import TextDataConfig, load_raw
from multissl.errors import DataError

DOCS = [f"Document number {i} talks about topic {i % 7} at some length." for i in range(60)]


def _write(tmp: Path, kind: str) -> Path:
    p = tmp / f"corpus.{kind}"
    if kind == "txt":
        p.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    elif kind == "jsonl":
        p.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS), encoding="utf-8")
    elif kind == "csv":
        p.write_text("id,body\n" + "".join(f'{i},"{d}"\n' for i, d in enumerate(DOCS)), encoding="utf-8")
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": DOCS}), p)
    return p


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv", "parquet"])
def test_local_formats(tmp_path: Path, kind: str) -> None:
    p = _write(tmp_path, kind)
    column = "text" if kind == "txt" else "body"
    train, held, _ = load_raw(TextDataConfig(files=[str(p)], text_column=column, validation_fraction=0.1), seed=0)
    texts = sorted(t.strip() for t in [*train["text"], *held["text"]])
    assert texts == sorted(DOCS) and len(held) == 6 and train.column_names == ["text"]


def test_folder_is_read_recursively(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one.txt").write_text("first doc here\n\nsecond doc here\n")
    (tmp_path / "a" / "b" / "two.txt").write_text("third doc here\n")
    (tmp_path / "a" / "notes.md").write_text("ignored")
    train, held, _ = load_raw(TextDataConfig(files=[str(tmp_path / "a")], validation_fraction=0.0), seed=0)
    assert sorted(t.strip() for t in train["text"]) == ["first doc here", "second doc here", "third doc here"]
    assert held is None


def test_embedded_corpus_has_disjoint_validation() -> None:
    train, held, source = load_raw(TextDataConfig(), seed=0)
    assert "embedded" in source and len(train) > 1500 and len(held) > 50
    assert not set(list(train["text"])) & set(list(held["text"]))


def test_embedded_corpus_with_docstrings_adds_only_training_text() -> None:
    """The larger corpus (the CLM preset's) keeps the same held-out help topics, so the topic task's
    eval paragraphs stay unseen, and adds standard-library docstrings (read from source) to training."""
    train, held, source = load_raw(TextDataConfig(embedded="python-docs+docstrings", validation_fraction=0.1), seed=0)
    small_train, small_held, _ = load_raw(TextDataConfig(validation_fraction=0.1), seed=0)
    assert source == "python-docs+docstrings (embedded)"
    assert list(held["text"]) == list(small_held["text"])
    assert set(small_train["text"]) <= set(train["text"]) and not set(train["text"]) & set(held["text"])
    words = sum(len(t.split()) for t in train["text"])
    assert len(train) > 5 * len(small_train) and words > 250_000
    assert any("Return" in t for t in set(train["text"]) - set(small_train["text"]))  # docstrings' style


@pytest.mark.parametrize(("setup", "needle"), [
    ("missing", "no such file or folder"),
    ("empty", "the corpus is empty"),
    ("blank_lines", "the corpus is empty"),
    ("latin1", "not valid UTF-8"),
    ("wrong_ext", "unsupported file type '.docx'"),
    ("no_column", "no column 'text' (columns: body)"),
    ("mixed", "mixes file types"),
    ("empty_folder", "holds no"),
])
def test_bad_input_names_the_culprit(tmp_path: Path, setup: str, needle: str) -> None:
    files = [str(tmp_path / "corpus.txt")]
    if setup == "empty":
        (tmp_path / "corpus.txt").write_text("")
    elif setup == "blank_lines":
        (tmp_path / "corpus.txt").write_text("\n   \n\n\t\n")
    elif setup == "latin1":
        (tmp_path / "corpus.txt").write_bytes("ok line\n\ncaf\u00e9 au lait\n".encode("latin-1"))
    elif setup == "wrong_ext":
        (tmp_path / "corpus.docx").write_text("x")
        files = [str(tmp_path / "corpus.docx")]
    elif setup == "no_column":
        files = [str(_write(tmp_path, "jsonl"))]
    elif setup == "mixed":
        files = [str(_write(tmp_path, "jsonl")), str(_write(tmp_path, "txt"))]
    elif setup == "empty_folder":
        (tmp_path / "d").mkdir()
        files = [str(tmp_path / "d")]
    with pytest.raises(DataError) as err:
        load_raw(TextDataConfig(files=files), seed=0)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg
    if setup in ("missing", "empty", "latin1"):
        assert "corpus.txt" in msg, "names the file"


def test_dataset_folder_with_named_splits(tmp_path: Path) -> None:
    """`data.dataset` goes through datasets.load_dataset, as a Hub id would (here a local folder)."""
    root = tmp_path / "ds"
    root.mkdir()
    (root / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:50]))
    (root / "validation.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[50:]))
    train, held, source = load_raw(TextDataConfig(dataset=str(root), eval_split="validation"), seed=0)
    assert len(train) == 50 and list(held["text"]) == DOCS[50:] and source == str(root)
    with pytest.raises(DataError, match="split 'test'"):
        load_raw(TextDataConfig(dataset=str(root), eval_split="test"), seed=0)


def test_non_utf8_jsonl_is_named(tmp_path: Path) -> None:
    good = _write(tmp_path, "jsonl")
    bad = tmp_path / "z_bad.jsonl"
    bad.write_bytes(json.dumps({"body": "caf\u00e9"}, ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"z_bad.jsonl: not valid UTF-8 \(first bad byte at offset 13\)"):
        load_raw(TextDataConfig(files=[str(good), str(bad)], text_column="body"), seed=0)


def test_embedded_docstrings_without_library_source_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Python that ships compiled modules only must not silently train on the smaller corpus."""
    import sysconfig

    from multissl.data import demo

    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "__init__.pyc").write_bytes(b"\0")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    demo.stdlib_docstring_paragraphs.cache_clear()
    try:
        with pytest.raises(DataError, match=f"no standard-library source with docstrings under {tmp_path}"):
            load_raw(TextDataConfig(embedded="python-docs+docstrings"), seed=0)
    finally:
        demo.stdlib_docstring_paragraphs.cache_clear()


def test_docstring_paragraphs_are_parsed_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard library is parsed once per installation (seconds); later runs read the cached rows."""
    import sysconfig

    from multissl.data import demo

    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "pkg" / "mod.py").write_text('"""Module text that is long enough.\n\nSecond paragraph of words here."""\n'
                                        'def f():\n    """A function docstring of five words."""\n')
    (lib / "test").mkdir()
    (lib / "test" / "skipped.py").write_text('"""Tests are not the library, so skipped."""\n')
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(lib)})
    monkeypatch.setenv("MULTISSL_CACHE", str(tmp_path / "cache"))
    demo.stdlib_docstring_paragraphs.cache_clear()
    try:
        first = demo.stdlib_docstring_paragraphs()
        assert [r["text"] for r in first] == ["Module text that is long enough.", "Second paragraph of words here.",
                                              "A function docstring of five words."]
        assert {r["topic"] for r in first} == {"pkg/mod"}
        monkeypatch.setattr(demo, "_read_stdlib_docstrings", lambda *a: pytest.fail("parsed again"))
        demo.stdlib_docstring_paragraphs.cache_clear()
        assert demo.stdlib_docstring_paragraphs() == first
        assert len(list((tmp_path / "cache").glob("stdlib-docstrings-v1-*/COMPLETE"))) == 1
    finally:
        demo.stdlib_docstring_paragraphs.cache_clear()
