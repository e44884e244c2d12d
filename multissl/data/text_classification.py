"""Labelled text for sequence classification: single texts or pairs, labels as names or ids.

Sources: local CSV/TSV/JSONL/JSON/parquet files, a Hub (or local) dataset, or the embedded topic
task (CPython documentation paragraphs labelled by the chapter they come from). Rows with an empty
text (blank, or only NUL/control characters) or no label are counted and skipped with a warning;
control characters are stripped from the others (counted); a label outside the label map is an error
naming its row and column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from multissl.data.files import TABLE_FILES, expand_files
from multissl.data.labels import LabelMap, infer_label_map, is_missing, stratified_subset, warn_skipped
from multissl.data.sources import open_dataset
from multissl.data.text import load_files
from multissl.data.text_checks import strip_controls
from multissl.errors import ConfigError, DataError


@dataclass
class TextClassificationDataConfig:
    """Where the labelled texts come from, and how much of the training labels to use."""

    files: list[str] = field(default_factory=list)
    """CSV/TSV/JSONL/JSON/parquet files with a text and a label column; empty (and no dataset) = the
    embedded topic task."""
    eval_files: list[str] = field(default_factory=list)
    dataset: str = ""
    """A Hub dataset id or a local dataset folder, for datasets.load_dataset."""
    dataset_config: str = ""
    split: str = "train"
    eval_split: str = ""
    """A named eval split of `dataset` (e.g. validation); empty = hold out validation_fraction."""
    text_column: str = "text"
    text_pair_column: str = ""
    """Second text of a pair (entailment, paraphrase); empty = single texts."""
    label_column: str = "label"
    labels: list[str] = field(default_factory=list)
    """Class names in id order; empty = the dataset's ClassLabel names, else the sorted distinct labels."""
    validation_fraction: float = 0.1
    max_seq_len: int = 128
    label_fraction: float = 1.0
    """Train on this share of the training rows (the same share of every class): label efficiency."""
    subset_seed: int = 0
    """Which rows a label_fraction below 1 keeps."""
    vocab_size: int = 4096
    """Vocabulary of the tokenizer trained on the task's texts when training from scratch without init_from."""
    end_with_eos: bool = True
    """Decoder models (GPT-2, Llama, ...), whose classifier reads the last token's state: the saved
    tokenizer ends every text with the end-of-text token, so that state is the same position in every
    text, one the model saw close documents in pretraining (as GPT-1's classifier token; pipeline()
    gets it too). Applies when the tokenizer pads with another token; encoders are left alone."""

    def __post_init__(self) -> None:
        if self.files and self.dataset:
            raise ConfigError("set either data.files or data.dataset, not both")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"data.label_fraction must be in (0, 1], got {self.label_fraction}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.max_seq_len < 8:
            raise ConfigError(f"data.max_seq_len must be >= 8, got {self.max_seq_len}")


@dataclass
class LabelledText:
    """Rows as ``{"text", "text_pair"?, "label" (id)}`` lists, with the label map and a source name."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    labels: LabelMap
    source: str


def _load_table(files: list[str], what: str) -> Any:
    paths = expand_files(files, TABLE_FILES, what)
    return load_files(paths, None, what, streaming=False), ", ".join(files)


def _raw_splits(cfg: TextClassificationDataConfig) -> tuple[Any, Any | None, str, str]:
    """``(train, eval or None, train source, eval source)``: the names errors and logs use."""
    if cfg.files:
        train, source = _load_table(cfg.files, "data.files")
        if cfg.eval_files:
            held, eval_source = _load_table(cfg.eval_files, "data.eval_files")
            return train, held, source, eval_source
        return train, None, source, f"{source} (held out)"
    if cfg.dataset:
        config = cfg.dataset_config
        held = open_dataset(cfg.dataset, split=cfg.eval_split, config_name=config) if cfg.eval_split else None
        train = open_dataset(cfg.dataset, split=cfg.split, config_name=config)
        return train, held, cfg.dataset, f"{cfg.dataset} split {cfg.eval_split or cfg.split}"
    from multissl.data.demo import demo_topic_splits

    train, held = demo_topic_splits()
    return train, held, "python-docs topics (embedded)", "python-docs topics (embedded, eval)"


def _check_columns(ds: Any, cfg: TextClassificationDataConfig, where: str) -> None:
    wanted = [("data.text_column", cfg.text_column), ("data.label_column", cfg.label_column)]
    if cfg.text_pair_column:
        wanted.append(("data.text_pair_column", cfg.text_pair_column))
    for key, column in wanted:
        if column not in ds.column_names:
            raise DataError(f"{where}: no column {column!r} (columns: {', '.join(ds.column_names)}); set {key}")


def _clean_text(value: Any) -> tuple[str | None, int]:
    """A cell as text without control characters (and how many went), or None when it holds no text."""
    if not isinstance(value, str):
        return None, 0
    text, stripped = strip_controls(value)
    return (text if text.strip() else None), stripped


def _rows(ds: Any, cfg: TextClassificationDataConfig, labels: LabelMap, where: str) -> list[dict[str, Any]]:
    """Checked rows; empty texts (blank, or nothing but NUL/control characters) and missing labels are
    counted, skipped and reported once; control characters are stripped from the rest, with a count."""
    texts = ds[cfg.text_column]
    pairs = ds[cfg.text_pair_column] if cfg.text_pair_column else None
    values = ds[cfg.label_column]
    rows, skipped = [], []
    stripped_chars, stripped_rows = 0, []
    for i, value in enumerate(values):
        row_name = f"{where}: row {i + 1}"
        text, n_text = _clean_text(texts[i])
        pair, n_pair = _clean_text(pairs[i]) if pairs is not None else (None, 0)
        if text is None or (pairs is not None and pair is None):
            skipped.append(f"{row_name} (empty text)")
            continue
        if is_missing(value):
            skipped.append(f"{row_name} (no label)")
            continue
        if n_text + n_pair:
            stripped_chars += n_text + n_pair
            stripped_rows.append(i + 1)
        row = {"text": text, "label": labels.to_id(value, f"{row_name}, column {cfg.label_column!r}")}
        if pairs is not None:
            row["text_pair"] = pair
        rows.append(row)
    warn_skipped(where, f"{len(skipped)} of {len(values)} rows", skipped)
    if stripped_chars:
        print(f"warning: {where}: stripped {stripped_chars} control character(s) (NUL and other C0/C1 controls) "
              f"from {len(stripped_rows)} row(s), e.g. row {stripped_rows[0]}", flush=True)
    if not rows:
        raise DataError(f"{where}: no usable rows (every row has an empty text or no label)")
    return rows


def load_labelled_text(cfg: TextClassificationDataConfig) -> LabelledText:
    """Train and eval rows with label ids; eval is held out by a hash of the text when not given."""
    from multissl.data.demo import is_heldout

    train_ds, eval_ds, source, eval_source = _raw_splits(cfg)
    _check_columns(train_ds, cfg, source)
    if eval_ds is not None:
        _check_columns(eval_ds, cfg, eval_source)
    feature = train_ds.features.get(cfg.label_column)
    labels = infer_label_map(train_ds[cfg.label_column], feature, cfg.labels)
    train = _rows(train_ds, cfg, labels, source)
    if eval_ds is not None:
        held = _rows(eval_ds, cfg, labels, eval_source)
    else:
        if cfg.validation_fraction == 0:
            raise ConfigError("fine-tuning needs an eval split: set data.eval_files / data.eval_split, or data.validation_fraction > 0")
        side = [is_heldout(r["text"] + r.get("text_pair", ""), cfg.validation_fraction) for r in train]
        held = [r for r, h in zip(train, side) if h]
        train = [r for r, h in zip(train, side) if not h]
        if not held or not train:
            raise DataError(f"{source}: too few rows ({len(side)}) to hold out data.validation_fraction="
                            f"{cfg.validation_fraction}; give data.eval_files")
    keep = stratified_subset([r["label"] for r in train], cfg.label_fraction, cfg.subset_seed)
    return LabelledText([train[i] for i in keep], held, labels, source)


def tokenize_rows(rows: list[dict[str, Any]], tokenizer: Any, max_seq_len: int) -> Any:
    """A `datasets.Dataset` of ``input_ids`` (+ ``token_type_ids`` for pairs), ``label`` and the
    text shown in predictions."""
    from datasets import Dataset

    texts = [r["text"] for r in rows]
    pairs = [r["text_pair"] for r in rows] if rows and "text_pair" in rows[0] else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_seq_len)
    cols: dict[str, Any] = {"input_ids": enc["input_ids"], "label": [r["label"] for r in rows],
                            "text": texts if pairs is None else [[t, p] for t, p in zip(texts, pairs)]}
    if pairs is not None and "token_type_ids" in enc:
        cols["token_type_ids"] = enc["token_type_ids"]
    return Dataset.from_dict(cols)
