"""Text corpora -> tokenizer -> packed fixed-length blocks, all through `datasets`.

Documents are tokenized in batches (in parallel with ``num_proc``; cached by `datasets` for file
sources), joined with a separator token and cut into blocks of ``max_seq_len`` so that padding is
about zero: only the last block of each map batch can be short, and no token is dropped.

Bad input (unusable files, control characters) is handled in `multissl.data.text_checks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from multissl.data.files import TEXT_FILES, builder_of, expand_files, naming_bad_files, read_files
from multissl.data.sources import open_dataset
from multissl.data.text_checks import (
    TextReport,
    strip_table_controls,
    strip_text_batch,
    usable_text_files,
)
from multissl.errors import ConfigError, DataError, first_line

PACK_BATCH = 1000  # documents per map batch: one possibly-short block per this many documents


@dataclass
class TextDataConfig:
    """Where the text comes from and how it becomes model inputs."""

    files: list[str] = field(default_factory=list)
    """Local files or folders (.txt .jsonl .json .csv .tsv .parquet); empty with no dataset = the embedded corpus."""
    dataset: str = ""
    """A Hub dataset id (or a local dataset folder) for datasets.load_dataset."""
    dataset_config: str = ""
    split: str = "train"
    eval_split: str = ""
    """A named eval split of `dataset`; empty = hold out validation_fraction of the training documents."""
    eval_files: list[str] = field(default_factory=list)
    validation_fraction: float = 0.05
    embedded: Literal["python-docs", "python-docs+docstrings"] = "python-docs"
    """The embedded corpus (no files, no dataset): CPython's help topics (~65k words), or those plus
    the standard library's docstrings (~303k words of training text; more than a small causal model memorises)."""
    text_column: str = "text"
    sample_by: Literal["line", "paragraph", "document"] = "paragraph"
    """How a .txt file splits into documents."""
    tokenizer: str = ""
    """A local tokenizer folder or Hub id; empty = train one on the corpus (saved with the model)."""
    vocab_size: int = 8192
    lowercase: bool = False
    """Lowercase text in a trained WordPiece tokenizer (BERT-uncased style)."""
    tokenizer_train_docs: int = 200_000
    max_seq_len: int = 128
    streaming: bool = False
    """Stream the corpus instead of loading it (no length: trainer.max_steps is required)."""
    shuffle_buffer: int = 10_000
    num_proc: int = 0
    """Processes for tokenization; 0 = one."""
    max_documents: int = 0
    """Use only the first N documents (0 = all); handy for quick runs."""
    on_bad_text: Literal["skip", "error"] = "skip"
    """A text file that is empty, whitespace-only, binary or not UTF-8 (nor UTF-16/32 with a byte-order
    mark): skip it with a warning naming it (listed in output_dir/data/skipped_text_files), or stop."""

    def __post_init__(self) -> None:
        if self.max_seq_len < 8:
            raise ConfigError(f"data.max_seq_len must be >= 8, got {self.max_seq_len}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.files and self.dataset:
            raise ConfigError("set either data.files or data.dataset, not both")


@dataclass
class TextData:
    tokenizer: Any
    train: Any
    eval: Any | None
    source: str
    skipped_files: int = 0
    """Text files left out as unusable (named in output_dir/data/skipped_text_files)."""


# ------------------------------------------------------------------------------- bad input

# ------------------------------------------------------------------------------- loading
def load_files(files: list[Path], cfg: TextDataConfig | None, what: str, streaming: bool,
               report: TextReport | None = None) -> Any:
    """Files of one type as one dataset. Text files are checked first (`check_text_file`): unusable ones
    are skipped as ``data.on_bad_text`` says, files with a UTF-16/32 byte-order mark are decoded by it,
    and control characters are stripped. An empty table is skipped with a warning, not read as rows."""
    import datasets

    report = report if report is not None else TextReport()
    builder = builder_of(files, what)
    on_bad = cfg.on_bad_text if cfg is not None else "skip"
    if builder != "text":
        empty = [f for f in files if f.stat().st_size == 0]
        if empty and on_bad == "error":
            raise DataError(f"{empty[0]}: the file is empty (data.on_bad_text=error)")
        if empty:
            if len(empty) == len(files):
                raise DataError(f"{what}: the corpus is empty ({', '.join(map(str, files[:3]))} hold no bytes)")
            print(f"warning: skipping {len(empty)} empty file(s), e.g. {empty[0]}", flush=True)
            report.skipped += [(f, "empty (0 bytes)") for f in empty]
            files = [f for f in files if f not in empty]
        report.files += len(files) + len(empty)
        report.used += files
        return read_files(files, what, streaming=streaming)

    checks = usable_text_files(files, what, on_bad, report)
    by_codec: dict[str, list[Path]] = {}
    for c in checks:
        by_codec.setdefault(c.encoding, []).append(c.path)
        if not c.encoding.startswith("utf-8"):  # UTF-8 with a BOM is still UTF-8 (its BOM is dropped)
            report.decoded.append((c.path, c.encoding))
        if c.controls:
            report.stripped_files[c.path] = c.controls
    report.used += [c.path for c in checks]
    sample_by = cfg.sample_by if cfg is not None else "paragraph"
    parts = [read_files(group, what, streaming=streaming, sample_by=sample_by,
                        **({"encoding": codec} if codec != "utf-8" else {}))  # utf-8: the cache key it always had
             for codec, group in by_codec.items()]
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if any(c.controls for c in checks):
        ds = ds.map(strip_text_batch, batched=True, **({} if streaming else {"desc": "stripping control characters"}))
    return ds


def load_hub(cfg: TextDataConfig, split: str) -> Any:
    return open_dataset(cfg.dataset, split=split, config_name=cfg.dataset_config, streaming=cfg.streaming)


def _check_column(ds: Any, column: str, source: str) -> None:
    names = getattr(ds, "column_names", None)
    if names is not None and column not in names:
        raise DataError(f"{source}: no column {column!r} (columns: {', '.join(names)}); set data.text_column")


def _is_text_files(files: list[Path]) -> bool:
    return bool(files) and all(f.suffix.lower() in (".txt", ".text") for f in files)


def load_raw(cfg: TextDataConfig, seed: int, report: TextReport | None = None) -> tuple[Any, Any | None, str]:
    """Raw ``(train, eval, source description)`` datasets with a text column, empties dropped.

    Skipped files and stripped characters go into ``report``; without one, their totals are printed here.
    """
    from multissl.data.demo import demo_text_splits

    own = report is None
    report = report if report is not None else TextReport()
    files: list[Path] = []
    if cfg.files:
        files = expand_files(cfg.files, TEXT_FILES)
        train, source = load_files(files, cfg, "data.files", cfg.streaming, report), ", ".join(cfg.files)
    elif cfg.dataset:
        train, source = load_hub(cfg, cfg.split), cfg.dataset
    else:
        train, held = demo_text_splits(cfg.validation_fraction, docstrings=cfg.embedded == "python-docs+docstrings")
        if cfg.streaming:
            train, held = train.to_iterable_dataset(), held.to_iterable_dataset()
        source = f"{cfg.embedded} (embedded)"
        out = _clean(train, "text", "demo corpus", cfg, report), _clean(held, "text", "demo corpus", cfg, report), source
        if own:
            report.finish(None)
        return out

    _check_column(train, cfg.text_column, source)
    eval_ds, eval_files = None, []
    if cfg.eval_files:
        eval_files = expand_files(cfg.eval_files, TEXT_FILES, "data.eval_files")
        eval_ds = load_files(eval_files, cfg, "data.eval_files", cfg.streaming, report)
        _check_column(eval_ds, cfg.text_column, "data.eval_files")
    elif cfg.eval_split:
        eval_ds = load_hub(cfg, cfg.eval_split)
        _check_column(eval_ds, cfg.text_column, f"{source} split {cfg.eval_split}")
    with naming_bad_files(report.used, source):  # the first full pass over the rows
        train = _clean(train, cfg.text_column, source, cfg, report, stripped=_is_text_files(files))
        if eval_ds is not None:
            eval_ds = _clean(eval_ds, cfg.text_column, "eval data", cfg, report, stripped=_is_text_files(eval_files))
    if eval_ds is None and cfg.validation_fraction > 0:
        if cfg.streaming:  # no length to split by: a document's hash decides its side
            from multissl.data.demo import is_heldout

            frac = cfg.validation_fraction
            eval_ds = train.filter(lambda b: [is_heldout(t, frac) for t in b["text"]], batched=True)
            train = train.filter(lambda b: [not is_heldout(t, frac) for t in b["text"]], batched=True)
        else:
            if len(train) < 2:
                raise DataError(f"{source}: only {len(train)} non-empty document(s); need at least 2 to hold out validation")
            parts = train.train_test_split(test_size=max(1, int(round(cfg.validation_fraction * len(train)))), seed=seed)
            train, eval_ds = parts["train"], parts["test"]
    if own:
        report.finish(None)
    return train, eval_ds, source



def _clean(ds: Any, column: str, source: str, cfg: TextDataConfig, report: TextReport, stripped: bool = False) -> Any:
    """Keep only the text column; cap the count when asked; strip control characters (unless the
    file check did: ``stripped``); drop empty documents."""
    ds = ds.select_columns([column])
    if column != "text":
        ds = ds.rename_column(column, "text")
    if cfg.max_documents:
        ds = ds.take(cfg.max_documents) if not hasattr(ds, "__len__") else ds.select(range(min(cfg.max_documents, len(ds))))
    if not stripped:
        ds = strip_table_controls(ds, source, report)
    ds = ds.filter(lambda b: [isinstance(t, str) and bool(t.strip()) for t in b["text"]], batched=True)
    if hasattr(ds, "__len__") and len(ds) == 0:
        raise DataError(f"{source}: the corpus is empty (no non-empty text in column {column!r})")
    return ds


# ----------------------------------------------------------------------------- tokenizer
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _wordpiece_backend(lowercase: bool) -> Any:
    """An untrained BERT-style WordPiece `tokenizers.Tokenizer` (normalizer, pre-tokenizer, decoder)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, clean_text=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def _wordpiece_initial_tokens(texts: list[str], lowercase: bool) -> list[str]:
    """The corpus's single characters, then its ``##`` continuation characters, each sorted by code point.

    A training with no merges (vocab size 1) makes exactly the tokens the real training starts from;
    only their ids are in hash-map order, so the sorted set is the same in every process. It needs
    the words, not their counts, so it reads each distinct space-separated piece once (a space
    always ends a word, whatever the normalizer does around it): a third of a full pass or less.
    """
    from tokenizers import trainers

    pieces: set[str] = set()
    for text in texts:
        pieces.update(text.split(" "))
    distinct = list(pieces)
    chunks = [" ".join(distinct[i : i + 1000]) for i in range(0, len(distinct), 1000)]
    tok = _wordpiece_backend(lowercase)
    tok.train_from_iterator(chunks, trainers.WordPieceTrainer(
        vocab_size=1, special_tokens=WORDPIECE_SPECIALS, show_progress=False))
    initial = set(tok.get_vocab()) - set(WORDPIECE_SPECIALS)
    return sorted(t for t in initial if not t.startswith("##")) + sorted(t for t in initial if t.startswith("##"))


def _train_wordpiece(texts: Any, vocab_size: int, lowercase: bool) -> Any:
    """A trained WordPiece `tokenizers.Tokenizer`, the same for the same corpus in every process.

    `tokenizers`' trainer gives the ``##x`` tokens ids in hash-map order (a new random hasher per
    map, whatever PYTHONHASHSEED or the thread count), and merges of equal count are chosen by
    those ids (huggingface/tokenizers#1794), so two trainings differ in ids and in ~2% of tokens.
    Listing the initial tokens, sorted, as specials after ours fixes their ids before any merge;
    they are then dropped from the added tokens again, staying in the vocab as ordinary pieces.
    """
    import json

    from tokenizers import Tokenizer, trainers

    texts = texts if isinstance(texts, list) else list(texts)
    pinned = WORDPIECE_SPECIALS + _wordpiece_initial_tokens(texts, lowercase)
    tok = _wordpiece_backend(lowercase)
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=pinned,
                                                             min_frequency=2))
    state = json.loads(tok.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] in WORDPIECE_SPECIALS]
    return Tokenizer.from_str(json.dumps(state))


def train_tokenizer(texts: Any, kind: Literal["mlm", "clm"], vocab_size: int, max_len: int, lowercase: bool,
                    algorithm: Literal["wordpiece", "bytelevel"] | None = None) -> Any:
    """A transformers tokenizer trained on ``texts``, identical for identical texts in any process.

    WordPiece with BERT's specials (default for MLM), or byte-level BPE: GPT-2 style for CLM,
    RoBERTa style (``<s> </s> <mask>``) for MLM. WordPiece is made deterministic in
    `_train_wordpiece` (at the cost of a quick extra pass); byte-level BPE already is, as all
    256 byte symbols get sorted ids up front and it has no continuation prefix.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    algorithm = algorithm or ("wordpiece" if kind == "mlm" else "bytelevel")
    if algorithm == "wordpiece":
        tok = _train_wordpiece(texts, vocab_size, lowercase)
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_len,
        )
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if kind == "mlm" else ["<|endoftext|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=kind == "mlm")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    if kind == "mlm":
        tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
            unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=max_len,
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|pad|>", model_max_length=max_len,
    )


def get_tokenizer(cfg: TextDataConfig, kind: Literal["mlm", "clm"], train: Any, save_dir: Path,
                  algorithm: Literal["wordpiece", "bytelevel"] | None = None) -> Any:
    """The configured tokenizer, the one saved by an earlier run in ``save_dir``, or a new one."""
    from transformers import AutoTokenizer

    if cfg.tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
        except Exception as err:
            raise DataError(f"data.tokenizer={cfg.tokenizer!r}: cannot load a tokenizer ({first_line(err)})") from None
    elif (save_dir / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(save_dir)
    else:
        def texts():
            for i, row in enumerate(train):
                if i >= cfg.tokenizer_train_docs:
                    return
                yield row["text"]

        tok = train_tokenizer(texts(), kind, cfg.vocab_size, cfg.max_seq_len, cfg.lowercase, algorithm)
        save_dir.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(save_dir)
    needed = ["mask_token", "cls_token", "sep_token", "pad_token"] if kind == "mlm" else ["eos_token"]
    missing = [t for t in needed if getattr(tok, t, None) is None]
    if missing:
        raise DataError(f"data.tokenizer={cfg.tokenizer!r} has no {', '.join(missing)}, which {kind.upper()} needs")
    if kind == "clm" and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# -------------------------------------------------------------------------------- packing
def pack_ids(docs: list[list[int]], block: int, sep: int | None) -> list[list[int]]:
    """Concatenate documents (each followed by ``sep``) and cut into ``block``-long pieces.

    Every token is kept; only the last piece may be shorter than ``block``.
    """
    stream: list[int] = []
    for d in docs:
        stream.extend(d)
        if sep is not None:
            stream.append(sep)
    return [stream[i : i + block] for i in range(0, len(stream), block)]


def _encoder(tokenizer: Any):
    """Whole documents -> ids, with no special tokens and no length warning (we cut blocks later)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return lambda texts: tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def packer(tokenizer: Any, kind: Literal["mlm", "clm"], max_seq_len: int):
    """A batched map function: ``{"text": [...]}`` -> ``{"input_ids": [blocks]}``."""
    encode = _encoder(tokenizer)
    if kind == "mlm":
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id

        def pack(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
            return {"input_ids": [[cls, *b, sep] for b in pack_ids(encode(batch["text"]), max_seq_len - 2, sep) if b]}
    else:
        eos = tokenizer.eos_token_id

        def pack(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
            return {"input_ids": pack_ids(encode(batch["text"]), max_seq_len, eos)}

    return pack


def pack_fingerprint(ds: Any, tokenizer: Any, kind: str, max_seq_len: int) -> str | None:
    """A cache key from what determines the blocks, so a rerun reuses `datasets`' cache.

    (datasets' own hash of the closure changes whenever the tokenizer object is rebuilt.)
    """
    import hashlib

    base = getattr(ds, "_fingerprint", None)
    if base is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tok = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    specials = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.eos_token_id)
    key = f"v1|{base}|{kind}|{max_seq_len}|{PACK_BATCH}|{specials}|{tok}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def tokenize_and_pack(ds: Any, tokenizer: Any, kind: Literal["mlm", "clm"], cfg: TextDataConfig) -> Any:
    fn = packer(tokenizer, kind, cfg.max_seq_len)
    kwargs: dict[str, Any] = {"batched": True, "batch_size": PACK_BATCH, "remove_columns": ["text"]}
    if hasattr(ds, "__len__"):
        if cfg.num_proc > 1:
            kwargs["num_proc"] = cfg.num_proc
        kwargs["desc"] = "tokenizing and packing"
        kwargs["new_fingerprint"] = pack_fingerprint(ds, tokenizer, kind, cfg.max_seq_len)
    return ds.map(fn, **kwargs)


def prepare_text(cfg: TextDataConfig, kind: Literal["mlm", "clm"], output_dir: str | Path, seed: int, trainer: Any = None,
                 tokenizer_algorithm: Literal["wordpiece", "bytelevel"] | None = None) -> TextData:
    """Load, tokenize and pack a corpus for ``kind``; the tokenizer is saved in ``output_dir/tokenizer``,
    the text files skipped as unusable are listed in ``output_dir/data/skipped_text_files``."""
    import contextlib

    first = trainer.main_process_first() if trainer is not None else contextlib.nullcontext()
    report = TextReport()
    with first:
        train, eval_raw, source = load_raw(cfg, seed, report)
        tokenizer = get_tokenizer(cfg, kind, train, Path(output_dir) / "tokenizer", tokenizer_algorithm)
        train_blocks = tokenize_and_pack(train, tokenizer, kind, cfg)
        eval_blocks = tokenize_and_pack(eval_raw, tokenizer, kind, cfg) if eval_raw is not None else None
    if cfg.streaming:
        train_blocks = train_blocks.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer)
        if trainer is not None and trainer.accelerator.num_processes > 1:
            from datasets.distributed import split_dataset_by_node

            acc = trainer.accelerator
            train_blocks = split_dataset_by_node(train_blocks, rank=acc.process_index, world_size=acc.num_processes)
            if eval_blocks is not None:
                eval_blocks = split_dataset_by_node(eval_blocks, rank=acc.process_index, world_size=acc.num_processes)
    elif len(train_blocks) == 0:
        raise DataError(f"{source}: no training blocks after tokenization")
    report.finish(output_dir, main=getattr(trainer, "is_main", True))
    return TextData(tokenizer, train_blocks, eval_blocks, source, len(report.skipped))
