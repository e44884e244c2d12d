"""One way to read a label column: missing cells, ids, names, ClassLabel names, the same in every task."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest

from multissl import probe
from multissl.data import image_text
from multissl.data.labels import (
    LabelMap,
    class_label_names,
    clean_label,
    infer_label_map,
    is_label_id,
    is_missing,
    sorted_names,
)


@pytest.mark.parametrize(("value", "missing"), [
    (None, True), ("", True), ("  ", True), (math.nan, True), (np.float64("nan"), True), (np.float32("nan"), True),
    (0, False), (0.0, False), ("0", False), (False, False), (math.inf, False), ("nan", False),
])
def test_is_missing(value: object, missing: bool) -> None:
    assert is_missing(value) is missing


@pytest.mark.parametrize(("value", "is_id"), [
    (0, True), (3, True), (np.int64(2), True), (np.uint8(1), True), (-1, True),
    (True, False), (np.bool_(True), False), (1.0, False), ("1", False), (None, False),
])
def test_is_label_id(value: object, is_id: bool) -> None:
    assert is_label_id(value) is is_id


@pytest.mark.parametrize(("value", "clean"), [
    (None, None), (math.nan, None), (np.float32("nan"), None), ("  ", None), (" cat ", "cat"),
    (3, 3), (np.int64(3), 3), (2.0, 2), (np.float32(1.0), 1), (True, 1), (np.bool_(False), 0), (1.5, "1.5"),
])
def test_clean_label(value: object, clean: object) -> None:
    got = clean_label(value)
    assert got == clean and type(got) is type(clean)


def test_sorted_names_and_class_label_names() -> None:
    assert sorted_names([" b", "a", None, "b ", math.nan, ""]) == ("a", "b")
    assert class_label_names(datasets.ClassLabel(names=["warm", "cool"])) == ("warm", "cool")
    assert class_label_names(datasets.Value("string")) is None and class_label_names(None) is None


def test_every_task_names_the_same_column_the_same_way() -> None:
    """Fine-tuning (`infer_label_map`), probes and zero-shot image labels: names sorted, ids in that order."""
    column = ["dog", " cat", None, "bird", "cat"]
    want = ("bird", "cat", "dog")
    assert infer_label_map(column).names == want
    names, to_id = probe._class_names([v for v in column if v is not None])
    assert tuple(names) == want and [to_id(v) for v in ("bird", " cat", "dog")] == [0, 1, 2]
    classnames, index = image_text._label_scheme(column)
    assert tuple(classnames) == want and index == LabelMap(want).label2id
    assert [image_text._label_id(v, index) for v in column] == [2, 1, -1, 0, 1]


def test_class_label_names_win_and_values_stay_ids() -> None:
    feature = datasets.ClassLabel(names=["warm", "leafy", "cool"])
    assert infer_label_map([0, 2], feature).names == ("warm", "leafy", "cool")
    classnames, index = image_text._label_scheme([0, 2, -1], feature)
    assert classnames == ["warm", "leafy", "cool"] and index is None
    assert [image_text._label_id(v, index) for v in (0, 2, -1)] == [0, 2, -1]


def test_integer_ids_are_ids() -> None:
    """Fine-tuning numbers classes 0..max; zero-shot keeps bare ids (no names); a CSV's floats are ids."""
    assert infer_label_map([2, 0, np.int64(1)]).names == ("0", "1", "2")
    assert image_text._label_scheme([2.0, math.nan, 0.0]) == (None, None)
    assert [image_text._label_id(v, None) for v in (2.0, math.nan, "x")] == [2, -1, -1]
    names, to_id = probe._class_names([10, np.int64(2), 2])
    assert names == ["2", "10"] and to_id(10) == 1
