"""Images alone (no captions) for image SSL: folders or datasets -> rows ``{"path", "bytes", "label"}``.

* ``data.files``: image files or folders, read recursively; an image in a sub-folder of a named
  folder takes the sub-folder's name as its label (imagefolder's layout), others have none (-1).
* ``data.dataset``: a Hub id or a ``save_to_disk`` folder with an image column (bytes or paths) and,
  optionally, a label column (ClassLabel names are kept).
* nothing: the embedded digits (`multissl.data.digits_demo`).

With ``data.streaming`` (`stream_images`), nothing is decoded or materialised up front: a dataset is
read as a `datasets` stream, a folder's listing (names only, no image read) becomes one; the trainer
batches it through the shared `multissl.training.loader.BufferedStream` (shuffle buffer, per-process
shards, seeds by position, exact resume), as for streamed audio.

Images are decoded in the collator (DataLoader workers), where a bad one is counted and skipped.
The held-out split is decided by a hash of each file's name (of the bytes, when embedded), the
same rule the probe uses, so pretraining never sees the images a probe evaluates on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from multissl.data.demo import HELDOUT_FRACTION, heldout_mask, is_heldout
from multissl.data.files import expand_files
from multissl.data.image_text import heldout_key
from multissl.data.images import image_cell
from multissl.errors import ConfigError, DataError
from multissl.training.loader import (
    BufferedStream,
    DatasetView,
    FixedSizeBatches,
    fixed_size_buffer,
    split_by_node,
)

IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageDataConfig:
    """Where the images come from and how bad ones are handled."""

    files: list[str] = field(default_factory=list)
    """Image files or folders (recursive; sub-folder names are labels); empty with no dataset = the embedded digits."""
    dataset: str = ""
    """A Hub dataset id or a save_to_disk folder with an image column."""
    split: str = "train"
    image_column: str = "image"
    label_column: str = "label"
    """Optional: used by probes and fine-tuning, never by pretraining."""
    validation_fraction: float = HELDOUT_FRACTION
    """Share held out for evaluation (by a hash of the file name), 0 = none."""
    on_bad_image: Literal["skip", "error"] = "skip"
    max_image_pixels: int = 64_000_000
    """Refuse larger images (decompression bombs); counted as bad."""
    streaming: bool = False
    """Read images as they come instead of loading the dataset's table first, for corpora too large to
    hold (a Hub dataset, parquet shards, a big save_to_disk folder); needs trainer.max_steps (a stream has
    no length). The held-out split is the same (a hash of each image's name), except that the small-corpus
    fallback that keeps both sides non-empty cannot apply to a stream."""
    shuffle_buffer: int = 1000
    """Streaming: rows shuffled together before being cut into batches (rounded down to whole batches).
    Rows of different buffers never share a batch, so a source sorted by class wants a buffer spanning
    several classes; rows, not decoded images, are held (embedded bytes count: 1000 x 100 KB = 100 MB)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.files and self.dataset:
            raise ConfigError("give data.files or data.dataset, not both")
        if self.max_image_pixels < 1:
            raise ConfigError(f"data.max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")


class ImageDataset(DatasetView):
    """Rows ``{"path", "bytes", "label"}`` and the class names labels index into (may be empty)."""

    def __init__(self, data: Any, classnames: list[str], source: str) -> None:
        super().__init__(data)
        self.classnames, self.source = classnames, source

    def paths(self) -> list[str]:
        return list(self.data["path"])

    def labels(self) -> list[int]:
        return list(self.data["label"])


class ImageStream:
    """One side (train or held-out) of a streamed image source: ``rows`` is a `datasets.IterableDataset`
    of ``{"path", "bytes", "label"}``; it has no length. `make_loader` calls `make_stream`, which
    batches this process's shard in fixed-size batches of shuffled buffers."""

    def __init__(self, rows: Any, cfg: ImageDataConfig, classnames: list[str], source: str) -> None:
        self.rows, self.cfg, self.classnames, self.source = rows, cfg, classnames, source

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def make_stream(self, *, batch_size: int, seed: int, shuffle: bool, drop_last: bool, rank: int,
                    world_size: int, split_tag: int) -> BufferedStream:
        """Training drops a short last batch (``drop_last``), as the non-streamed sampler does: a batch
        of one or two images is noise for batch-norm and contrastive losses."""
        return BufferedStream(split_by_node(self.rows, rank, world_size), FixedSizeBatches(batch_size, drop_last),
                              buffer_size=fixed_size_buffer(self.cfg.shuffle_buffer, batch_size), seed=seed,
                              shuffle=shuffle, split_tag=split_tag, rank=rank)


def _folder_rows(paths: list[str]) -> tuple[dict[str, list[Any]], list[str]]:
    """Every image under ``paths`` with the name of the sub-folder it sits in (below a named folder) as label."""
    found: list[tuple[Path, str | None]] = []
    for raw in paths:
        root = Path(raw).expanduser()
        for f in expand_files([raw], IMAGE_FILES):
            rel = f.relative_to(root).parts if root.is_dir() else ()
            found.append((f, rel[0] if len(rel) > 1 else None))
    names = sorted({label for _, label in found if label is not None})
    index = {n: i for i, n in enumerate(names)}
    cols = {"path": [str(f.resolve()) for f, _ in found], "bytes": [None] * len(found),
            "label": [index[label] if label is not None else -1 for _, label in found]}
    return cols, names


def _open_images(cfg: ImageDataConfig, streaming: bool) -> tuple[Any, list[str]]:
    """The split of ``data.dataset`` with its image column checked and left undecoded, and the
    ClassLabel names of its label column (``[]`` without)."""
    import datasets

    from multissl.data.labels import class_label_names
    from multissl.data.sources import open_dataset

    ds = open_dataset(cfg.dataset, split=cfg.split, streaming=streaming)
    # A stream from some sources (json on the Hub) declares no features: its first row names the columns.
    columns = list(ds.features) if ds.features is not None else list(next(iter(ds), {}))
    if cfg.image_column not in columns:
        raise DataError(f"data.dataset={cfg.dataset!r}: no column {cfg.image_column!r} (columns: "
                        f"{', '.join(columns)}); set data.image_column")
    if ds.features is not None and isinstance(ds.features[cfg.image_column], datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    names = class_label_names(ds.features.get(cfg.label_column)) if ds.features is not None else None
    return ds, list(names or [])


def _image_row(row: dict[str, Any], i: int | None, cfg: ImageDataConfig) -> dict[str, Any]:
    """A dataset row as ``{"path", "bytes", "label"}``; a label that is not an integer id (a string, a
    missing value) is -1. Embedded bytes are named ``dataset[i]`` by their row, or, with ``i`` None
    (streams), ``dataset[crc32:...]`` by their held-out key: a stream's row numbers restart in each
    process's shard, so they would name the wrong image."""
    where = f"{cfg.dataset}[{i if i is not None else '?'}]"
    blob, path = image_cell(row[cfg.image_column], where, cfg.image_column)
    if blob is not None or not path:
        path = where if i is not None else f"{cfg.dataset}[{heldout_key('', blob)}]"
    label = row.get(cfg.label_column)
    return {"path": path, "bytes": blob,
            "label": int(label) if isinstance(label, (int, np.integer)) and not isinstance(label, bool) else -1}


def _dataset_rows(cfg: ImageDataConfig) -> tuple[dict[str, list[Any]], list[str]]:
    ds, names = _open_images(cfg, streaming=False)
    cols: dict[str, list[Any]] = {"path": [], "bytes": [], "label": []}
    for i, row in enumerate(ds):
        for k, v in _image_row(row, i, cfg).items():
            cols[k].append(v)
    return cols, names


def _table(cols: dict[str, list[Any]]) -> Any:
    import datasets

    return datasets.Dataset.from_dict(cols, features=datasets.Features({
        "path": datasets.Value("string"), "bytes": datasets.Value("binary"), "label": datasets.Value("int64")}))


def _listing(cfg: ImageDataConfig) -> tuple[dict[str, list[Any]], list[str], str]:
    """The rows of ``data.files`` (or the embedded digits), their class names and a description."""
    if cfg.files:
        files, source = cfg.files, ", ".join(cfg.files)
    else:
        from multissl.data.digits_demo import default_digits_corpus

        files, source = [str(default_digits_corpus())], "embedded digits (MNIST, 5,000)"
    cols, names = _folder_rows(files)
    return cols, names, source


def prepare_images(cfg: ImageDataConfig) -> tuple[ImageDataset, ImageDataset | None]:
    """``(train, eval)``: the rows of ``cfg``'s source split by a hash of each image's name, loaded
    whole (``data.streaming`` is `stream_images`' business; fine-tuning always loads whole)."""
    if cfg.dataset:
        cols, names = _dataset_rows(cfg)
        source = cfg.dataset
    else:
        cols, names, source = _listing(cfg)
    if not cols["path"]:
        raise DataError(f"{source}: no images")
    ds = _table(cols)
    if cfg.validation_fraction == 0:
        return ImageDataset(ds, names, source), None
    keys = [heldout_key(p, b) for p, b in zip(cols["path"], cols["bytes"])]
    held = heldout_mask(keys, cfg.validation_fraction)
    if held is None:
        raise DataError(f"{source}: only {len(keys)} image(s); need at least 2 to hold out an eval split")
    return (ImageDataset(ds.select(np.flatnonzero(~held).tolist()), names, source),
            ImageDataset(ds.select(np.flatnonzero(held).tolist()), names, source))


def stream_images(cfg: ImageDataConfig) -> tuple[ImageStream, ImageStream | None]:
    """``(train, held-out)`` streams of ``cfg``'s source (held-out None when ``validation_fraction``
    is 0). A row is held out by `is_heldout` of its `heldout_key`, the rule `heldout_mask` applies,
    so both sides hold the images they hold without streaming (bar the tiny-corpus fallback, which
    needs every key at once); embedded images are named by that key, not by row. A folder's files are listed (not read) first; that keeps its sub-folder
    labels and names equal to the loaded ones. A bad image reaches the collator, which skips and
    counts it as it does without streaming."""
    if cfg.dataset:
        raw, names = _open_images(cfg, streaming=True)
        rows = raw.map(lambda row: _image_row(row, None, cfg)).select_columns(["path", "bytes", "label"])
        source = cfg.dataset
    else:
        from multissl.data.sources import MAX_DISK_SHARDS

        cols, names, source = _listing(cfg)
        if not cols["path"]:
            raise DataError(f"{source}: no images")
        # Several shards, so that processes can take whole shards (`split_by_node`).
        rows = _table(cols).to_iterable_dataset(num_shards=min(len(cols["path"]), MAX_DISK_SHARDS))
    if cfg.validation_fraction == 0:
        return ImageStream(rows, cfg, names, source), None
    fraction = cfg.validation_fraction

    def held(row: dict[str, Any]) -> bool:
        return is_heldout(heldout_key(row["path"], row["bytes"]), fraction)

    return (ImageStream(rows.filter(lambda r: not held(r)), cfg, names, source),
            ImageStream(rows.filter(held), cfg, names, source))
