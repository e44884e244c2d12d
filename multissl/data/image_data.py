"""Images alone (no captions) for image SSL: folders or datasets -> rows ``{"path", "bytes", "label"}``.

* ``data.files``: image files or folders, read recursively; an image in a sub-folder of a named
  folder takes the sub-folder's name as its label (imagefolder's layout), others have none (-1).
* ``data.dataset``: a Hub id or a ``save_to_disk`` folder with an image column (bytes or paths) and,
  optionally, a label column (ClassLabel names are kept).
* nothing: the embedded digits (`multissl.data.digits_demo`).

Images are decoded in the collator (DataLoader workers), where a bad one is counted and skipped.
The held-out split is decided by a hash of each file's name (of the bytes, when embedded), the
same rule the probe uses, so pretraining never sees the images a probe evaluates on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from multissl.data.demo import HELDOUT_FRACTION, heldout_mask
from multissl.data.files import expand_files
from multissl.data.image_text import heldout_key
from multissl.data.images import image_cell
from multissl.errors import ConfigError, DataError
from multissl.training.loader import DatasetView

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

    def __post_init__(self) -> None:
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.files and self.dataset:
            raise ConfigError("give data.files or data.dataset, not both")
        if self.max_image_pixels < 1:
            raise ConfigError(f"data.max_image_pixels must be >= 1, got {self.max_image_pixels}")


class ImageDataset(DatasetView):
    """Rows ``{"path", "bytes", "label"}`` and the class names labels index into (may be empty)."""

    def __init__(self, data: Any, classnames: list[str], source: str) -> None:
        super().__init__(data)
        self.classnames, self.source = classnames, source

    def paths(self) -> list[str]:
        return list(self.data["path"])

    def labels(self) -> list[int]:
        return list(self.data["label"])


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


def _dataset_rows(cfg: ImageDataConfig) -> tuple[dict[str, list[Any]], list[str]]:
    import datasets

    from multissl.data.labels import class_label_names
    from multissl.data.sources import open_dataset

    ds = open_dataset(cfg.dataset, split=cfg.split)
    if cfg.image_column not in ds.column_names:
        raise DataError(f"data.dataset={cfg.dataset!r}: no column {cfg.image_column!r} (columns: "
                        f"{', '.join(ds.column_names)}); set data.image_column")
    if isinstance(ds.features[cfg.image_column], datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    names = class_label_names(ds.features.get(cfg.label_column)) or []
    has_label = cfg.label_column in ds.column_names
    cols: dict[str, list[Any]] = {"path": [], "bytes": [], "label": []}
    for i, row in enumerate(ds):
        blob, path = image_cell(row[cfg.image_column], f"{cfg.dataset}[{i}]", cfg.image_column)
        cols["path"].append(path if blob is None and path else f"{cfg.dataset}[{i}]")
        cols["bytes"].append(blob)
        label = row.get(cfg.label_column) if has_label else None
        cols["label"].append(int(label) if isinstance(label, (int, np.integer)) and not isinstance(label, bool) else -1)
    return cols, list(names)


def prepare_images(cfg: ImageDataConfig) -> tuple[ImageDataset, ImageDataset | None]:
    """``(train, eval)``: the rows of ``cfg``'s source split by a hash of each image's name."""
    import datasets

    if cfg.dataset:
        cols, names = _dataset_rows(cfg)
        source = cfg.dataset
    else:
        if cfg.files:
            files, source = cfg.files, ", ".join(cfg.files)
        else:
            from multissl.data.digits_demo import default_digits_corpus

            files, source = [str(default_digits_corpus())], "embedded digits (MNIST, 5,000)"
        cols, names = _folder_rows(files)
    if not cols["path"]:
        raise DataError(f"{source}: no images")
    ds = datasets.Dataset.from_dict(cols, features=datasets.Features({
        "path": datasets.Value("string"), "bytes": datasets.Value("binary"), "label": datasets.Value("int64")}))
    if cfg.validation_fraction == 0:
        return ImageDataset(ds, names, source), None
    keys = [heldout_key(p, b) for p, b in zip(cols["path"], cols["bytes"])]
    held = heldout_mask(keys, cfg.validation_fraction)
    if held is None:
        raise DataError(f"{source}: only {len(keys)} image(s); need at least 2 to hold out an eval split")
    return (ImageDataset(ds.select(np.flatnonzero(~held).tolist()), names, source),
            ImageDataset(ds.select(np.flatnonzero(held).tolist()), names, source))
