"""Image-text data for CLIP-style pretraining: sources -> rows of (image, captions, label) -> batches.

Loading reads only tables (captions, labels, image paths) and checks that the referenced files exist;
images are decoded, converted to RGB and transformed in the collator, inside DataLoader workers.
Every source ends up as rows ``{"path", "bytes"?, "captions", "label"?}``:

* ``path``: the image file, or a name such as ``"ds[12]"`` for bytes embedded in a dataset;
* ``bytes``: those embedded bytes (only for a ``data.dataset`` source; ``None`` on rows with a file);
* ``captions``: one or more non-empty strings (rows of a table naming the same image are merged);
* ``label``: an integer class id (-1 = none), when the source has a label column.

The held-out split is decided by a hash of each image's file name (of the bytes, when embedded), so
it does not depend on the seed, the order of rows or the machine.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from multissl.data.demo import heldout_mask
from multissl.data.files import (
    BUILDERS,
    IMAGE_TABLE_FILES,
    SkipWarnings,
    check_table,
    naming_bad_files,
    quiet_builders,
    read_files,
)
from multissl.data.images import BadImage, blank_output, image_cell, load_image, seeded_rngs, skipped_ids
from multissl.data.labels import LabelMap, class_label_names, clean_label, sorted_names
from multissl.data.sources import open_dataset
from multissl.errors import ConfigError, DataError
from multissl.training.loader import DatasetView, SeededStream, split_by_node

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
METADATA_IMAGE_KEY = "file_name"  # imagefolder's column naming each image, relative to the metadata file
CAPTION_FALLBACKS = ("captions", "caption", "text")  # metadata columns tried when caption_key is absent
DEFAULT_LABEL_COLUMN = "label"
ROW_COLUMNS = ["path", "bytes", "captions", "label"]
NAMED_IN_WARNINGS = 3


@dataclass
class ImageTextDataConfig:
    """Where the image-caption pairs come from and how bad images are handled."""

    files: list[str] = field(default_factory=list)
    """Image folders in imagefolder layout (images + metadata.jsonl or metadata.csv with ``file_name`` and a
    caption column), or such metadata files themselves; empty with no csv/dataset = the embedded shapes demo."""
    csv: str = ""
    """A .csv/.tsv of image paths (relative to the file, else to the working directory) and captions, like
    open_clip's --train-data CSV (a .csv whose header has tabs but no commas is read as tab-separated, as
    open_clip does); rows naming the same image are merged into one image with several captions."""
    image_key: str = "filepath"
    """Column of `csv` with the image paths (open_clip's --csv-img-key default)."""
    caption_key: str = "title"
    """Caption column of `csv` and of metadata files (open_clip's --csv-caption-key default); each row of a
    metadata file takes the first of this, "captions", "caption" and "text" that it fills (rows may differ)."""
    dataset: str = ""
    """A Hub dataset id, or a local save_to_disk / parquet folder, with image and caption columns."""
    split: str = "train"
    """Split of `dataset` to load."""
    image_column: str = "image"
    """Column of `dataset` with the images: an ``Image`` feature, ``{"bytes", "path"}`` dicts, bytes, or paths."""
    caption_column: str = "text"
    """Column of `dataset` with the captions: a string, or a list of strings (several captions per image)."""
    label_column: str = DEFAULT_LABEL_COLUMN
    """Optional class id/name column, for zero-shot eval; "" = ignore labels."""
    streaming: bool = False
    """Read rows as they come instead of loading the tables first (needs trainer.max_steps)."""
    validation_fraction: float = 0.1
    """Share of images held out for eval, chosen by a hash of the file name; 0 = no held-out set."""
    on_bad_image: Literal["skip", "error"] = "skip"
    """Count and skip an undecodable or oversized image with a warning, or stop with an error naming it."""
    max_image_pixels: int = 64_000_000
    """Images with more pixels (width x height, read from the header) are bad input: a decompression-bomb guard."""

    def __post_init__(self) -> None:
        if sum(bool(x) for x in (self.files, self.csv, self.dataset)) > 1:
            raise ConfigError("set at most one of data.files, data.csv and data.dataset")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.on_bad_image not in ("skip", "error"):
            raise ConfigError(f"data.on_bad_image must be 'skip' or 'error', got {self.on_bad_image!r}")
        if self.max_image_pixels <= 0:
            raise ConfigError(f"data.max_image_pixels must be positive, got {self.max_image_pixels}")


class ImageTextCollator:
    """``(samples, generator) -> {"images", "texts", "labels", "valid", "skipped", "skipped_ids"}``.

    ``transform`` (open_clip's train or val preprocess) maps an RGB PIL image to a tensor and runs
    under `seeded_rngs`, seeded once a batch from the batch generator; ``tokenizer`` maps a
    list of captions to ``(B, L)`` token ids. With several captions, training (``sample_caption``)
    picks one with the generator, eval takes the first.

    A batch keeps one row per sample, so every process holds the same number of rows for the
    gathers of a contrastive loss, even when all its images are bad: a bad image's row holds zeros,
    an empty caption and label -1, and is False in ``valid``, which the objective scores as nothing.
    Bad images are warned about for the first few (per DataLoader worker) and counted in ``skipped``
    (this copy, every read) and in the batch's ``skipped`` and ``skipped_ids`` (`skip_id` of each bad
    file's name), from which the objective counts each bad file once.
    """

    def __init__(self, transform: Callable[[Any], torch.Tensor], tokenizer: Callable[[list[str]], torch.Tensor],
                 on_bad_image: str = "skip", max_image_pixels: int = 64_000_000, sample_caption: bool = True) -> None:
        if on_bad_image not in ("skip", "error"):
            raise ConfigError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        self.transform, self.tokenizer = transform, tokenizer
        self.on_bad_image, self.max_image_pixels, self.sample_caption = on_bad_image, max_image_pixels, sample_caption
        self.warnings = SkipWarnings("image", NAMED_IN_WARNINGS)

    @classmethod
    def from_config(cls, cfg: ImageTextDataConfig, transform: Callable[[Any], torch.Tensor],
                    tokenizer: Callable[[list[str]], torch.Tensor], sample_caption: bool = True) -> ImageTextCollator:
        return cls(transform, tokenizer, cfg.on_bad_image, cfg.max_image_pixels, sample_caption)

    def _skip(self, err: BadImage) -> None:
        self.warnings.skip(err)

    def _caption(self, captions: Any, u: float) -> str:
        captions = [captions] if isinstance(captions, str) else list(captions)
        return captions[min(int(u * len(captions)), len(captions) - 1)] if self.sample_caption else captions[0]

    def __call__(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        # Drawn up front from the batch generator: the caption picks (one per position) and the seed
        # the transforms' crops are drawn from, in order, so a batch is the same in any worker.
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        picks = torch.rand(len(samples), generator=generator, dtype=torch.float64).tolist()
        images: list[torch.Tensor | None] = []
        texts: list[str] = []
        labels: list[int] = []
        bad: list[str] = []
        # The global generators are seeded, saved and restored once a batch: per image, that cost
        # about half the collation time of a batch of small images.
        with seeded_rngs(seed):
            for sample, u in zip(samples, picks):
                blob = sample.get("bytes")
                try:
                    img = load_image(blob if blob is not None else sample["path"], sample["path"], self.max_image_pixels)
                except BadImage as err:
                    if self.on_bad_image == "error":
                        raise BadImage(str(err)) from None
                    self._skip(err)
                    bad.append(str(sample["path"]))
                    images.append(None)
                    texts.append("")
                    labels.append(-1)
                    continue
                images.append(self.transform(img))
                texts.append(self._caption(sample["captions"], u))
                label = sample.get("label")
                labels.append(-1 if label is None else int(label))
        good = [x for x in images if x is not None]
        blank = torch.zeros_like(good[0]) if good else blank_output(self.transform)
        return {"images": torch.stack([blank if x is None else x for x in images]),
                "texts": torch.as_tensor(self.tokenizer(texts), dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long),
                "valid": torch.tensor([x is not None for x in images], dtype=torch.bool),
                "skipped": torch.tensor(len(bad)), "skipped_ids": skipped_ids(bad)}


# ------------------------------------------------------------------------------- datasets
class ImageTextDataset(DatasetView):
    """A `datasets.Dataset` of rows ``{"path", "bytes"?, "captions", "label"?}``, batched by the
    trainer's fixed-size sharded sampler. ``classnames[i]`` names label id ``i`` (None without names)."""

    def __init__(self, data: Any, classnames: list[str] | None = None, source: str = "") -> None:
        super().__init__(data)
        self.classnames, self.source = classnames, source


class ImageTextStream:
    """A streamed side (train or held-out): ``data`` is a `datasets.IterableDataset` of the same rows
    (``bytes`` None and ``label`` -1 where absent). No ``__len__``; `make_loader` batches this process's
    shard with `SeededStream` (`make_stream`); ``classnames`` is known only from a ``ClassLabel`` feature (or the demo)."""

    def __init__(self, data: Any, classnames: list[str] | None = None, source: str = "",
                 tables: list[Path] | None = None, what: str = "") -> None:
        self.data, self.classnames, self.source = data, classnames, source
        self.tables, self.what = tables or [], what
        """The tables the rows are read from (CSV or metadata files) and the config key naming them:
        a line that does not parse, met while streaming, is a `DataError` naming its file and line."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.tables:
            yield from self.data
            return
        with quiet_builders(), naming_bad_files(self.tables, self.what):
            yield from self.data

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(epoch)

    def shard(self, rank: int, world_size: int) -> ImageTextStream:
        """This process's part of the stream (`multissl.training.loader.split_by_node`)."""
        return ImageTextStream(split_by_node(self.data, rank, world_size), self.classnames, self.source, self.tables,
                               self.what)

    def make_stream(self, *, batch_size: int, seed: int, shuffle: bool, drop_last: bool, rank: int,
                    world_size: int, split_tag: int) -> Any:
        """`make_loader`'s hook: this process's shard, in fixed-size batches tagged with their seeds."""
        return SeededStream(self.shard(rank, world_size), batch_size, seed=seed, split_tag=split_tag, rank=rank)


# ------------------------------------------------------------------------------- rows and labels
def captions_of(value: Any) -> list[str]:
    """The non-empty captions of a cell (a string or a list of strings), stripped; [] when missing."""
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, (list, tuple)):
        return []
    return [c.strip() for c in value if isinstance(c, str) and c.strip()]


def _label_scheme(values: list[Any], feature: Any = None) -> tuple[list[str] | None, dict[str, int] | None]:
    """``(classnames, name -> id)``: a ``ClassLabel``'s names (values are already ids), the sorted
    distinct names of a column of strings, or ``(None, None)`` for bare integer ids."""
    names = class_label_names(feature)
    if names is not None:
        return list(names), None
    present = [v for v in map(clean_label, values) if v is not None]
    if all(isinstance(v, int) for v in present):
        return None, None
    names = sorted_names(present)
    return list(names), LabelMap(names).label2id


def _label_id(value: Any, index: dict[str, int] | None) -> int:
    """A row's class id for zero-shot eval; a missing or unknown label is -1 (no class), not an error."""
    v = clean_label(value)
    if v is None:
        return -1
    if index is None:
        return v if isinstance(v, int) else -1
    return index.get(str(v), -1)


def heldout_key(path: str, blob: bytes | None = None) -> str:
    """What decides a row's side: the image's file name, or the CRC of embedded bytes (which have no
    stable name of their own)."""
    return f"crc32:{zlib.crc32(blob):08x}" if blob is not None else Path(path).name


def _missing_column(where: str, name: str, columns: list[str], key: str, extra: str = "") -> DataError:
    return DataError(f"{where}: no column {name!r}{extra} (columns: {', '.join(columns)}); set data.{key}")


def _label_column(columns: list[str], cfg: ImageTextDataConfig, where: str) -> str | None:
    """The label column, if any; asking for a column other than the default that is not there is an error."""
    if cfg.label_column in columns:
        return cfg.label_column
    if cfg.label_column and cfg.label_column != DEFAULT_LABEL_COLUMN:
        raise _missing_column(where, cfg.label_column, columns, "label_column", extra=' ("" = no labels)')
    return None


# ------------------------------------------------------------------------------- tables: csv and imagefolder metadata
def _read_table(path: Path, what: str, streaming: bool = False) -> Any:
    check_table(path, IMAGE_TABLE_FILES, what)
    tabs = BUILDERS[path.suffix.lower()] == "csv" and _tab_separated(path)
    return read_files([path], what, streaming=streaming, tabs=tabs)


def _tab_separated(path: Path) -> bool:
    """A .tsv, or a .csv whose header has tabs and no commas: open_clip reads its CSVs with tabs by default."""
    if path.suffix.lower() == ".tsv":
        return True
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline()
    return "\t" in header and "," not in header


def _table_columns(path: Path, columns: list[str], cfg: ImageTextDataConfig, metadata: bool
                   ) -> tuple[str, list[str], str | None]:
    """``(image, caption columns, label or None)`` of a CSV (open_clip's keys) or an imagefolder
    metadata file. A metadata file may mix caption columns (one row ``caption``, the next ``text``):
    every known one present is returned, in the order tried, and each row takes the first it fills
    (`_row_captions`)."""
    if metadata:
        image = METADATA_IMAGE_KEY if METADATA_IMAGE_KEY in columns else cfg.image_key
        if image not in columns:
            raise _missing_column(str(path), METADATA_IMAGE_KEY, columns, "image_key", extra=f" (nor {cfg.image_key!r})")
        tried = list(dict.fromkeys([cfg.caption_key, *CAPTION_FALLBACKS]))
    else:
        image, tried = cfg.image_key, [cfg.caption_key]
        if image not in columns:
            raise _missing_column(str(path), image, columns, "image_key")
    captions = [c for c in tried if c in columns]
    if not captions:
        extra = f" (nor {', '.join(map(repr, CAPTION_FALLBACKS))})" if metadata else ""
        raise _missing_column(str(path), cfg.caption_key, columns, "caption_key", extra=extra)
    return image, captions, _label_column(columns, cfg, str(path))


def _row_captions(cells: Any) -> list[str]:
    """A row's captions: those of the first of its caption cells (in the order tried) that has any."""
    for cell in cells:
        captions = captions_of(cell)
        if captions:
            return captions
    return []


def _image_file(rel: Any, base: Path, try_cwd: bool) -> Path | None:
    """Where a table's image path points: relative to the table's folder (then, for CSVs as open_clip
    reads them, to the working directory); None for an empty cell."""
    if not isinstance(rel, str) or not rel.strip():
        return None
    p = Path(rel.strip()).expanduser()
    if p.is_absolute():
        return p
    here = base / p
    if try_cwd and not here.is_file() and p.is_file():
        return p.absolute()
    return here


class _Rows:
    """Rows gathered from tables, one per image: a second row naming an image adds its captions."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.captions: list[list[str]] = []
        self.labels: list[Any] = []
        self.dropped: list[str] = []
        self.seen = 0
        self._where: dict[str, int] = {}

    def add(self, path: str, captions: list[str], label: Any) -> None:
        i = self._where.setdefault(path, len(self.paths))
        if i == len(self.paths):
            self.paths.append(path)
            self.captions.append(captions)
            self.labels.append(label)
        else:
            self.captions[i] = list(dict.fromkeys(self.captions[i] + captions))


def _gather_table(path: Path, cfg: ImageTextDataConfig, metadata: bool, rows: _Rows) -> None:
    """Add one table's rows; a missing image file is an error naming its row, a row without a caption
    (in any of the caption columns) is dropped, counted and named in one warning."""
    what = "data.files" if metadata else "data.csv"
    ds = _read_table(path, what)
    image_col, caption_cols, label_col = _table_columns(path, ds.column_names, cfg, metadata)
    labels = ds[label_col] if label_col else itertools.repeat(None)
    captions_by_row = zip(*(ds[c] for c in caption_cols))
    base = path.parent.absolute()
    for row, (rel, cells, label) in enumerate(zip(ds[image_col], captions_by_row, labels), start=1):
        rows.seen += 1
        captions = _row_captions(cells)
        if not captions:
            rows.dropped.append(f"{path}: row {row} ({rel})")
            continue
        file = _image_file(rel, base, try_cwd=not metadata)
        if file is None:
            raise DataError(f"{path}: row {row}: empty {image_col!r}")
        if not file.is_file():
            raise DataError(f"{path}: row {row}: no such image file: {file}")
        rows.add(str(file), captions, label)


def metadata_files(paths: list[str]) -> list[Path]:
    """imagefolder metadata files of ``data.files``: named directly, at a folder's top, else found
    below it (each names images relative to its own folder)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_file():
            if p.suffix.lower() not in IMAGE_TABLE_FILES:
                raise DataError(f"data.files: {p}: expected an image folder with metadata.jsonl or metadata.csv, "
                                "or such a metadata file")
            out.append(p)
        elif p.is_dir():
            found = [p / n for n in METADATA_NAMES if (p / n).is_file()] or \
                sorted(f for f in p.rglob("metadata.*") if f.name in METADATA_NAMES and f.is_file())
            if not found:
                raise DataError(f"data.files: folder {p} has no metadata.jsonl or metadata.csv "
                                f"(imagefolder layout: a {METADATA_IMAGE_KEY} column and a caption column)")
            folders = [f.parent for f in found]
            twice = sorted({str(d) for d in folders if folders.count(d) > 1})
            if twice:
                raise DataError(f"data.files: {twice[0]} holds both metadata.jsonl and metadata.csv; keep one")
            out.extend(found)
        else:
            raise DataError(f"data.files: no such file or folder: {p}")
    return out


def _tables(cfg: ImageTextDataConfig) -> tuple[list[Path], bool, str]:
    """``(tables, are imagefolder metadata, description)`` of a table source (the demo when none is set)."""
    if cfg.csv:
        return [Path(cfg.csv).expanduser()], False, cfg.csv
    if cfg.files:
        return metadata_files(cfg.files), True, ", ".join(cfg.files)
    from multissl.data.shapes_demo import default_shapes_corpus

    return [default_shapes_corpus()], True, "shapes demo (embedded)"


def _load_tables(cfg: ImageTextDataConfig) -> tuple[Any, list[str] | None, str]:
    import datasets

    tables, metadata, source = _tables(cfg)
    rows = _Rows()
    for table in tables:
        _gather_table(table, cfg, metadata, rows)
    _warn_dropped(rows.dropped, rows.seen)
    cols: dict[str, list[Any]] = {"path": rows.paths, "captions": rows.captions}
    classnames = None
    if any(label is not None for label in rows.labels):
        classnames, index = _label_scheme(rows.labels)
        cols["label"] = [_label_id(v, index) for v in rows.labels]
    cols["_key"] = [heldout_key(p) for p in rows.paths]
    features = {"path": datasets.Value("string"), "captions": datasets.List(datasets.Value("string")),
                "label": datasets.Value("int64"), "_key": datasets.Value("string")}
    ds = datasets.Dataset.from_dict(cols, features=datasets.Features({c: features[c] for c in cols}))
    return ds, classnames, source


def _warn_dropped(dropped: list[str], total: int) -> None:
    if dropped:
        print(f"warning: dropping {len(dropped)} of {total} row(s) without a caption: "
              f"{'; '.join(dropped[:NAMED_IN_WARNINGS])}" + (" ..." if len(dropped) > NAMED_IN_WARNINGS else ""),
              flush=True)


# ------------------------------------------------------------------------------- datasets sources (Hub, disk, parquet)
def _open_dataset(cfg: ImageTextDataConfig, streaming: bool) -> Any:
    """The split of ``data.dataset`` (a save_to_disk folder, or anything `load_dataset` reads), with
    an ``Image`` column cast to undecoded ``{"bytes", "path"}`` and its columns checked."""
    import datasets

    ds = open_dataset(cfg.dataset, split=cfg.split, streaming=streaming)
    columns = list(ds.features) if ds.features is not None else list(next(iter(ds), {}))
    where = f"data.dataset={cfg.dataset!r}"
    if cfg.image_column not in columns:
        raise _missing_column(where, cfg.image_column, columns, "image_column")
    if cfg.caption_column not in columns:
        raise _missing_column(where, cfg.caption_column, columns, "caption_column")
    _label_column(columns, cfg, where)
    if ds.features is not None and isinstance(ds.features[cfg.image_column], datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    return ds


def _dataset_row_maker(cfg: ImageTextDataConfig, index: dict[str, int] | None, check_files: bool) -> Callable:
    """A function ``(row, row index) -> normalised row`` for a ``data.dataset`` source."""
    name = Path(cfg.dataset).name or cfg.dataset
    base = Path(cfg.dataset).expanduser()
    base = base.absolute() if base.is_dir() else Path.cwd()
    image_col, caption_col, label_col = cfg.image_column, cfg.caption_column, cfg.label_column

    def make(row: dict[str, Any], i: int) -> dict[str, Any]:
        blob, where = image_cell(row[image_col], f"{cfg.dataset}[{i}]", image_col)
        if blob is not None:
            path = f"{name}[{i}]" + (f":{where}" if where else "")
        else:
            file = Path(where).expanduser()
            file = file if file.is_absolute() else (base / file).absolute()
            if check_files and not file.is_file():
                raise DataError(f"data.dataset={cfg.dataset!r} row {i + 1}: no such image file: {file}")
            path = str(file)
        label = _label_id(row[label_col], index) if label_col in row else -1
        return {"path": path, "bytes": blob, "captions": captions_of(row[caption_col]), "label": label,
                "_key": heldout_key(path, blob)}

    return make


def _load_dataset_source(cfg: ImageTextDataConfig) -> tuple[Any, list[str] | None, str]:
    import datasets

    ds = _open_dataset(cfg, streaming=False)
    captions = [captions_of(v) for v in ds[cfg.caption_column]]
    keep = [i for i, c in enumerate(captions) if c]
    _warn_dropped([f"{cfg.dataset}[{i}]" for i, c in enumerate(captions) if not c], len(captions))
    has_label = cfg.label_column in ds.column_names
    classnames, index = _label_scheme(list(ds[cfg.label_column]), ds.features[cfg.label_column]) if has_label else (None, None)
    make = _dataset_row_maker(cfg, index, check_files=True)

    def batch_rows(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        made = [make({k: v[j] for k, v in batch.items()}, i) for j, i in enumerate(indices)]
        return {k: [m[k] for m in made] for k in made[0]} if made else {}

    features = datasets.Features({"path": datasets.Value("string"), "bytes": datasets.Value("binary"),
                                  "captions": datasets.List(datasets.Value("string")), "label": datasets.Value("int64"),
                                  "_key": datasets.Value("string")})
    out = ds.map(batch_rows, batched=True, batch_size=256, with_indices=True, remove_columns=ds.column_names,
                 features=features, desc="indexing images")
    if len(keep) < len(out):
        out = out.select(keep)
    if not has_label:
        out = out.remove_columns("label")
    return out, classnames, cfg.dataset


# ------------------------------------------------------------------------------- entry points
def load_image_text(cfg: ImageTextDataConfig) -> tuple[Any, list[str] | None, str]:
    """``(rows, classnames, description)``: a `datasets.Dataset` of normalised rows plus a ``_key``
    column (what decides the held-out side)."""
    ds, classnames, source = _load_dataset_source(cfg) if cfg.dataset else _load_tables(cfg)
    if len(ds) == 0:
        raise DataError(f"{source}: no image with a caption")
    return ds, classnames, source


def prepare_image_text(
    cfg: ImageTextDataConfig, seed: int = 0
) -> tuple[ImageTextDataset | ImageTextStream, ImageTextDataset | ImageTextStream | None]:
    """``(train, held-out)``: `ImageTextDataset`s, or `ImageTextStream`s with ``cfg.streaming``; the
    held-out side is None when ``validation_fraction`` is 0. With no source configured: the embedded
    shapes demo (`multissl.data.shapes_demo.default_shapes_corpus`).

    The split does not depend on ``seed`` (a hash of each file name decides), so it is stable across
    runs; on tiny sets whole file names are moved so that neither side is empty.
    """

    del seed  # kept for the prepare_* signature; nothing here is random
    if cfg.streaming:
        return stream_image_text(cfg)
    ds, classnames, source = load_image_text(cfg)
    keys = list(ds["_key"])
    ds = ds.remove_columns("_key")
    if cfg.validation_fraction == 0:
        return ImageTextDataset(ds, classnames, source), None
    mask = heldout_mask(keys, cfg.validation_fraction)
    if mask is None:
        raise DataError(f"{source}: only {len(ds)} distinct image(s); need at least 2 to hold out validation "
                        "(or set data.validation_fraction=0)")
    train, held = np.flatnonzero(~mask).tolist(), np.flatnonzero(mask).tolist()
    return ImageTextDataset(ds.select(train), classnames, source), ImageTextDataset(ds.select(held), classnames, source)


# ------------------------------------------------------------------------------- streaming
def _stream_table(path: Path, cfg: ImageTextDataConfig, metadata: bool, index: dict[str, int] | None) -> Any:
    """Rows of one table as they are read; a missing file reaches the collator, which skips it as bad."""
    what = "data.files" if metadata else "data.csv"
    ds = _read_table(path, what, streaming=True)
    with quiet_builders(), naming_bad_files([path], what):  # a stream that declares no features is read here for its columns
        columns = list(ds.features) if ds.features is not None else list(next(iter(ds), {}))
    image_col, caption_cols, label_col = _table_columns(path, columns, cfg, metadata)
    base = path.parent.absolute()

    def make(row: dict[str, Any]) -> dict[str, Any]:
        file = _image_file(row.get(image_col), base, try_cwd=not metadata)
        return {"path": str(file) if file else "", "bytes": None,
                "captions": _row_captions(row.get(c) for c in caption_cols),
                "label": _label_id(row.get(label_col), index) if label_col else -1}

    return ds.map(make).select_columns(ROW_COLUMNS)


def stream_image_text(cfg: ImageTextDataConfig) -> tuple[ImageTextStream, ImageTextStream | None]:
    """``(train, held-out)`` streams of normalised rows; rows without a caption (or an image path)
    are dropped as they come, and a row is held out by the same hash as `prepare_image_text` uses.

    Labels are names only for a ``ClassLabel`` column (or the demo, whose classes are known); other
    string labels cannot be numbered without reading everything first, so they stream as -1.
    """
    import datasets

    tables: list[Path] = []
    if cfg.dataset:
        raw = _open_dataset(cfg, streaming=True)
        names = class_label_names(raw.features.get(cfg.label_column)) if raw.features is not None else None
        classnames = list(names) if names is not None else None
        make = _dataset_row_maker(cfg, None, check_files=False)  # ClassLabel values are ids already
        rows = raw.map(lambda row, i: {k: v for k, v in make(row, i).items() if k != "_key"}, with_indices=True,
                       remove_columns=list(raw.features) if raw.features is not None else None)
        rows, source = rows.select_columns(ROW_COLUMNS), cfg.dataset
    else:
        from multissl.data.shapes_demo import CLASSNAMES

        tables, metadata, source = _tables(cfg)
        classnames = list(CLASSNAMES) if not cfg.csv and not cfg.files else None  # the demo's classes are known
        index = LabelMap(tuple(classnames)).label2id if classnames else None
        parts = [_stream_table(t, cfg, metadata, index) for t in tables]
        rows = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    rows = rows.filter(lambda r: bool(r["captions"]) and bool(r["path"]))
    what = "data.csv" if cfg.csv else "data.files"
    if cfg.validation_fraction == 0:
        return ImageTextStream(rows, classnames, source, tables, what), None
    from multissl.data.demo import is_heldout

    fraction = cfg.validation_fraction

    def held(row: dict[str, Any]) -> bool:
        return is_heldout(heldout_key(row["path"], row["bytes"]), fraction)

    return (ImageTextStream(rows.filter(lambda r: not held(r)), classnames, source, tables, what),
            ImageTextStream(rows.filter(held), classnames, source, tables, what))
