"""Class labels for fine-tuning: names <-> ids, checked row by row, and label-fraction subsets.

Labels arrive as names (``"positive"``) or ids (``1``), with or without a `datasets.ClassLabel`
feature; one `LabelMap` turns them into ids and names the row and column of any value it cannot
place, so a typo in a label file is an error, not a silently wrong class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    """None, a blank string or NaN (what pandas-backed CSV readers give an empty cell)."""
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def infer_label_map(values: Sequence[Any], feature: Any = None, configured: Sequence[str] = ()) -> LabelMap:
    """Names from the config (``data.labels``), else the `ClassLabel` feature, else the data: sorted
    distinct names, or ``"0".."max"`` for integer ids. Needs at least two classes."""
    import numpy as np

    if configured:
        names = tuple(str(n) for n in configured)
    elif feature is not None and hasattr(feature, "names"):
        names = tuple(feature.names)
    else:
        present = [v for v in values if not is_missing(v)]
        if present and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in present):
            negative = [int(v) for v in present if int(v) < 0]
            if negative:
                raise DataError(f"label id {negative[0]} is negative (unlabelled rows, as in some test splits?); "
                                "drop them or give names in data.labels")
            names = tuple(str(i) for i in range(int(max(present)) + 1))
        else:
            names = tuple(sorted({str(v).strip() for v in present}))
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
