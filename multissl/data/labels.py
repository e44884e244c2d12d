"""Class labels for fine-tuning: names <-> ids, checked row by row, and label-fraction subsets.

Labels arrive as names (``"positive"``) or ids (``1``), with or without a `datasets.ClassLabel`
feature; one `LabelMap` turns them into ids and names the row and column of any value it cannot
place, so a typo in a label file is an error, not a silently wrong class. The small readers below
(`is_missing`, `is_label_id`, `sorted_names`, `class_label_names`, `clean_label`) are what every
task (fine-tuning, probes, zero-shot image labels) reads a label column with.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from multissl.errors import DataError

# numpy is imported where used: the CLI builds its parsers (probe's included) on every call


@dataclass(frozen=True)
class LabelMap:
    names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def to_id(self, value: Any, where: str) -> int:
        """The id of ``value`` (a name, or an id given as an int); ``where`` names row and column."""
        import numpy as np

        if isinstance(value, bool) or value is None:
            raise DataError(f"{where}: label {value!r} is not a class name or id")
        if isinstance(value, (int, np.integer)):
            if not 0 <= int(value) < self.num_labels:
                raise DataError(f"{where}: label id {int(value)} is outside 0..{self.num_labels - 1} "
                                f"({', '.join(self.names)})")
            return int(value)
        index = self.label2id.get(str(value).strip())
        if index is None:
            shown = ", ".join(self.names[:12]) + (" ..." if self.num_labels > 12 else "")
            raise DataError(f"{where}: unknown label {value!r}; known labels: {shown}")
        return index


def is_missing(value: Any) -> bool:
    """None, a blank string or NaN (what pandas-backed CSV readers give an empty cell; numpy's too)."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and math.isnan(value)


def is_label_id(value: Any) -> bool:
    """An integer class id (numpy's too); a bool is not one."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def sorted_names(values: Iterable[Any]) -> tuple[str, ...]:
    """The distinct labels present, stripped, in sorted order: class names when the data gives names."""
    return tuple(sorted({str(v).strip() for v in values if not is_missing(v)}))


def class_label_names(feature: Any) -> tuple[str, ...] | None:
    """The names of a `datasets.ClassLabel` feature (its values are already ids), else None."""
    names = getattr(feature, "names", None)
    return tuple(names) if names is not None else None


def clean_label(value: Any) -> int | str | None:
    """A cell as an id or a stripped name; None when missing. Integral floats and bools are ids: CSV
    readers turn an integer column with an empty cell into floats."""
    import numpy as np

    if is_missing(value):
        return None
    if isinstance(value, (numbers.Integral, np.bool_)):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    return str(value).strip() or None


def infer_label_map(values: Sequence[Any], feature: Any = None, configured: Sequence[str] = ()) -> LabelMap:
    """Names from the config (``data.labels``), else the `ClassLabel` feature, else the data: sorted
    distinct names, or ``"0".."max"`` for integer ids. Needs at least two classes."""
    names = tuple(str(n) for n in configured) or class_label_names(feature)
    if names is None:
        present = [v for v in values if not is_missing(v)]
        if present and all(is_label_id(v) for v in present):
            negative = [int(v) for v in present if int(v) < 0]
            if negative:
                raise DataError(f"label id {negative[0]} is negative (unlabelled rows, as in some test splits?); "
                                "drop them or give names in data.labels")
            names = tuple(str(i) for i in range(int(max(present)) + 1))
        else:
            names = sorted_names(present)
    if len(set(names)) != len(names):
        raise DataError(f"label names repeat: {list(names)}")
    if len(names) < 2:
        raise DataError(f"classification needs at least 2 classes; the labels are {list(names)}")
    return LabelMap(names)


def stratified_subset(labels: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Indices of a ``fraction`` of the rows, the same fraction of every class (at least one each),
    in a seeded order; a smaller fraction's subset is contained in a larger one's (same seed)."""
    import numpy as np

    if fraction >= 1.0:
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    keep: list[int] = []
    for c in np.unique(labels_arr):
        rows = np.flatnonzero(labels_arr == c)
        rows = rows[rng.permutation(len(rows))]
        keep.extend(rows[: max(1, math.ceil(fraction * len(rows)))].tolist())
    return sorted(keep)


def warn_skipped(where: str, what: str, named: list[str], shown: int = 3) -> None:
    """One warning for rows dropped as unusable, naming the first few."""
    if named:
        more = " ..." if len(named) > shown else ""
        print(f"warning: {where}: skipped {what}: {'; '.join(named[:shown])}{more}", flush=True)
