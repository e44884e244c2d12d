"""Embedded demo data, made offline from what every Python installation carries.

Text: CPython's bundled ``pydoc_data.topics`` (the language reference's help topics, ~65k words of
English with code), split into paragraphs, each kept with the topic it comes from; optionally with
the docstrings of the standard library's own source (~245k more words about programming), so that a
causal model has more text than it can memorise.
"""

from __future__ import annotations

import ast
import functools
import re
import sysconfig
import zlib
from pathlib import Path

import numpy as np


def python_doc_paragraphs(min_words: int = 4) -> list[dict[str, str]]:
    """Paragraphs of the CPython help topics as ``{"text", "topic"}`` rows, in a fixed order."""
    from pydoc_data.topics import topics

    return [{"text": text, "topic": topic} for topic in sorted(topics)
            for text in paragraphs(topics[topic], min_words) if not set(text) <= set("*=-~^ ")]


def paragraphs(text: str, min_words: int) -> list[str]:
    """The blank-line-separated paragraphs of ``text`` with at least ``min_words`` words, each on one line."""
    joined = (" ".join(para.split()) for para in re.split(r"\n\s*\n", text))
    return [para for para in joined if len(para.split()) >= min_words]


def is_heldout(text: str, fraction: float) -> bool:
    """Stable, order-independent split: a paragraph's CRC decides its side."""
    return (zlib.crc32(text.encode("utf-8")) % 10_000) < fraction * 10_000


def heldout_mask(keys: list[str], fraction: float) -> np.ndarray | None:
    """Which rows to hold out, whole keys at a time; ``None`` when the keys cannot be split."""
    uniq = sorted(set(keys))
    if len(uniq) < 2:
        return None
    held_keys = {k for k in uniq if is_heldout(k, fraction)}
    if not held_keys or len(held_keys) == len(uniq):  # small corpora: take whole keys by hash rank
        counts = {k: 0 for k in uniq}
        for k in keys:
            counts[k] += 1
        held_keys, total = set(), 0
        for k in sorted(uniq, key=lambda k: zlib.crc32(k.encode("utf-8"))):
            if total >= max(1, round(fraction * len(keys))) or len(held_keys) == len(uniq) - 1:
                break
            held_keys.add(k)
            total += counts[k]
    return np.array([k in held_keys for k in keys])


#: Parts of the standard library that are not its documented modules (tests, the IDE, vendored code).
_NOT_LIBRARY = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip", "turtledemo"}


@functools.lru_cache(maxsize=2)
def stdlib_docstring_paragraphs(min_words: int = 4) -> tuple[dict[str, str], ...]:
    """Paragraphs of the docstrings (module, class, function) in this Python's standard library source,
    as ``{"text", "topic": module path}`` rows in a fixed order. Parsing ~600 files takes seconds, so
    they are read once per Python installation into the cache (``$MULTISSL_CACHE/stdlib-docstrings-v1-*``)."""
    import hashlib
    import json
    import sys

    from multissl.data.files import build_once, cache_root

    root = Path(sysconfig.get_paths()["stdlib"])
    key = hashlib.sha1(f"{sys.version}|{root}|{min_words}".encode()).hexdigest()[:12]
    final = cache_root() / f"stdlib-docstrings-v1-{key}"

    def build(folder: Path) -> None:
        rows = _read_stdlib_docstrings(root, min_words)
        (folder / "paragraphs.json").write_text(json.dumps(rows), encoding="utf-8")
        (folder / "COMPLETE").write_text(f"{len(rows)} paragraphs from {root} ({sys.version.split()[0]})\n")

    build_once(final, lambda folder: (folder / "COMPLETE").is_file(), build)
    return tuple(json.loads((final / "paragraphs.json").read_text(encoding="utf-8")))


def _read_stdlib_docstrings(root: Path, min_words: int) -> list[dict[str, str]]:
    """The docstring paragraphs of the library's source under ``root``, read with ``ast``: nothing is imported."""
    rows = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _NOT_LIBRARY.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):  # a file this Python cannot parse is not its library
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                rows += [{"text": text, "topic": str(rel.with_suffix(""))}
                         for text in paragraphs(ast.get_docstring(node) or "", min_words)]
    if not rows:
        from multissl.errors import DataError

        raise DataError(f"data.embedded=python-docs+docstrings: no standard-library source with docstrings under {root} "
                        "(this Python ships compiled modules only); use data.embedded=python-docs or data.files=...")
    return rows


def demo_text_splits(validation_fraction: float = 0.05, docstrings: bool = False):
    """``(train, validation)`` `datasets.Dataset`s of the embedded corpus. The help topics are split
    by hash (so the topic task's held-out paragraphs stay held out); the docstrings, when asked for,
    all train, less any paragraph that is also a help topic's."""
    from datasets import Dataset

    rows = python_doc_paragraphs()
    train = [r for r in rows if not is_heldout(r["text"], validation_fraction)]
    held = [r for r in rows if is_heldout(r["text"], validation_fraction)]
    if docstrings:
        seen = {r["text"] for r in rows}
        train += [r for r in stdlib_docstring_paragraphs() if r["text"] not in seen]
    as_cols = lambda rs: {"text": [r["text"] for r in rs], "topic": [r["topic"] for r in rs]}  # noqa: E731
    return Dataset.from_dict(as_cols(train)), Dataset.from_dict(as_cols(held))


# ------------------------------------------------------------------- the embedded text task
#: Each help topic's part of the Python documentation: the label of the topic-classification task.
#: Grouped by the chapter a topic comes from (language reference / library reference), so a label
#: is a fact about the paragraph's origin, not a judgement.
TOPIC_CATEGORIES: dict[str, tuple[str, ...]] = {
    "statements": (
        "assert", "assignment", "async", "augassign", "break", "class", "compound", "continue", "del", "else",
        "for", "function", "global", "if", "import", "nonlocal", "pass", "raise", "return", "try", "while",
        "with", "yield",
    ),
    "expressions": (
        "atom-identifiers", "atom-literals", "attribute-references", "await", "binary", "bitwise", "booleans",
        "calls", "comparisons", "conversions", "dict", "exprlists", "floating", "identifiers", "imaginary",
        "in", "integers", "lambda", "lists", "numbers", "operator-summary", "power", "shifting", "slicings", "strings",
        "subscriptions", "unary",
    ),
    "data model": (
        "attribute-access", "callable-types", "context-managers", "customization", "id-classes",
        "numeric-types", "objects", "sequence-types", "specialattrs", "specialnames", "types",
    ),
    "built-in types": (
        "bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object", "bltin-type-objects",
        "formatstrings", "string-methods", "truth", "typesfunctions", "typesmapping", "typesmethods",
        "typesmodules", "typesseq", "typesseq-mutable",
    ),
    "execution and debugging": ("debugger", "dynamic-features", "exceptions", "execmodel", "naming"),
}
TOPIC_LABELS = tuple(TOPIC_CATEGORIES)
#: Paragraphs held out for the topic task's eval split. The text pretraining presets hold out the same
#: paragraphs (``data.validation_fraction`` 0.1 selects exactly these), so a pretrained model has
#: never seen the texts it is evaluated on.
TOPIC_HELDOUT_FRACTION = 0.1
HELDOUT_FRACTION = 0.2
"""Eval share when a source has no eval split of its own: probes and image pretraining hold out the
same files by it, so a pretrained model is probed on data it never saw."""


def topic_category(topic: str) -> str | None:
    for category, topics in TOPIC_CATEGORIES.items():
        if topic in topics:
            return category
    return None


def demo_topic_splits():
    """``(train, eval)`` `datasets.Dataset`s of the topic task: ``{"text", "label"}`` rows, label one of
    `TOPIC_LABELS` (the documentation chapter a paragraph comes from)."""
    from datasets import ClassLabel, Dataset, Features, Value

    rows = [(r["text"], topic_category(r["topic"])) for r in python_doc_paragraphs()]
    rows = [(t, c) for t, c in rows if c is not None]
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(TOPIC_LABELS))})

    def build(part: list[tuple[str, str]]) -> Dataset:
        return Dataset.from_dict({"text": [t for t, _ in part], "label": [TOPIC_LABELS.index(c) for _, c in part]},
                                 features=features)

    held = [r for r in rows if is_heldout(r[0], TOPIC_HELDOUT_FRACTION)]
    train = [r for r in rows if not is_heldout(r[0], TOPIC_HELDOUT_FRACTION)]
    return build(train), build(held)
