"""`open_dataset`: save_to_disk folders (of a Dataset or a DatasetDict), bad folders, Hub ids; and the
one table of file types with `read_files`."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from multissl.data.files import (
    AUDIO_FILES,
    BUILDERS,
    IMAGE_TABLE_FILES,
    MANIFEST_FILES,
    TABLE_FILES,
    TEXT_FILES,
    check_table,
    read_files,
)
from multissl.data.sources import looks_like_path, open_dataset
from multissl.errors import DataError


def rows(n: int, tag: str) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": [f"{tag} {i}" for i in range(n)], "label": list(range(n))})


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Path]:
    """A folder saved from a `Dataset` and one saved from a `DatasetDict` (train + test)."""
    single, both = tmp_path / "single", tmp_path / "both"
    rows(5, "one").save_to_disk(str(single))
    datasets.DatasetDict({"train": rows(4, "train"), "test": rows(3, "test")}).save_to_disk(str(both))
    return single, both


def test_dataset_folder_is_read_whatever_the_split(saved: tuple[Path, Path]) -> None:
    ds = open_dataset(str(saved[0]), split="train")
    assert isinstance(ds, datasets.Dataset) and ds["text"] == [f"one {i}" for i in range(5)]


def test_dataset_dict_folder_gives_the_requested_split(saved: tuple[Path, Path]) -> None:
    assert open_dataset(str(saved[1]), split="test")["text"] == ["test 0", "test 1", "test 2"]
    assert open_dataset(str(saved[1]), split="train")["text"] == [f"train {i}" for i in range(4)]


def test_missing_split_names_the_folder_and_the_splits(saved: tuple[Path, Path]) -> None:
    with pytest.raises(DataError) as err:
        open_dataset(str(saved[1]), split="validation", where="data.eval_split")
    msg = str(err.value)
    folder = saved[1]
    assert msg == f"data.eval_split={str(folder)!r}: {folder} has no split 'validation' (splits: train, test)"


@pytest.mark.parametrize("which", [0, 1])
def test_streaming_a_folder_keeps_every_row_in_shards(saved: tuple[Path, Path], which: int) -> None:
    ds = open_dataset(str(saved[which]), split="test" if which else "train", streaming=True)
    assert isinstance(ds, datasets.IterableDataset)
    assert ds.num_shards == (3 if which else 5), "at most 8 shards, and no more shards than rows"
    assert sorted(r["text"] for r in ds) == (["test 0", "test 1", "test 2"] if which else
                                             [f"one {i}" for i in range(5)])


def test_missing_local_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    with pytest.raises(DataError, match=r"^data\.dataset='.*/no/such': no such dataset folder: .*/no/such$"):
        open_dataset(str(missing), split="train")


def test_folder_that_is_not_a_dataset_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("not a dataset\n")
    with pytest.raises(DataError) as err:
        open_dataset(str(tmp_path), split="train")
    msg = str(err.value)
    assert msg.startswith(f"data.dataset={str(tmp_path)!r} split 'train': ") and "\n" not in msg


def test_hub_failure_is_one_line_naming_the_id(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub\nTraceback and more lines")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError) as err:
        open_dataset("someone/corpus", split="train", config_name="en")
    want = "data.dataset='someone/corpus' split 'train': Couldn't reach 'someone/corpus' on the Hub"
    assert str(err.value) == want


def test_hub_id_goes_to_load_dataset_with_its_config(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: calls.append((*a, kw)) or "loaded")
    assert open_dataset("glue", split="validation", config_name="sst2", streaming=True) == "loaded"
    assert open_dataset("owner/name", split="train", config_name="") == "loaded"
    assert calls == [("glue", "sst2", {"split": "validation", "streaming": True}),
                     ("owner/name", None, {"split": "train", "streaming": False})]


@pytest.mark.parametrize(("name", "is_path"), [
    ("glue", False), ("owner/name", False), ("/data/corpus", True), ("./corpus", True), ("~/corpus", True),
    ("data/saved/corpus", True), ("..", True),
])
def test_what_looks_like_a_path(name: str, is_path: bool) -> None:
    assert looks_like_path(name) is is_path


# ------------------------------------------------------------------------------- files
def test_every_source_takes_the_types_it_took() -> None:
    assert set(TABLE_FILES) == {".csv", ".tsv", ".jsonl", ".json", ".parquet"} == set(MANIFEST_FILES)
    assert set(TEXT_FILES) == set(TABLE_FILES) | {".txt", ".text"}
    assert set(IMAGE_TABLE_FILES) == set(TABLE_FILES) - {".parquet"}
    assert set(AUDIO_FILES) == {".wav", ".flac", ".ogg", ".mp3"}
    assert set(TEXT_FILES) == set(BUILDERS), "every table or text type has a builder"


@pytest.mark.parametrize(("name", "body", "tabs"), [
    ("t.tsv", "text\tlabel\na, b\tx\n", None),  # a .tsv is tab-separated: the comma stays in the text
    ("t.csv", "text\tlabel\na, b\tx\n", True),  # a tab-separated .csv, when the caller says so
    ("t.csv", "text,label\n\"a, b\",x\n", None),
    ("t.jsonl", '{"text": "a, b", "label": "x"}\n', None),
])
def test_read_files_picks_the_builder_and_separator(tmp_path: Path, name: str, body: str, tabs: bool | None) -> None:
    (tmp_path / name).write_text(body)
    ds = read_files([tmp_path / name], "data.files", tabs=tabs)
    assert ds.column_names == ["text", "label"] and ds[0] == {"text": "a, b", "label": "x"}


def test_read_files_and_check_table_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("text\nx\n")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(DataError, match=r"^data.files: mixes file types \(.csv, .jsonl\); use one kind per corpus$"):
        read_files([tmp_path / "a.csv", tmp_path / "b.jsonl"], "data.files")
    (tmp_path / "bad.jsonl").write_text('{"text": "unterminated\n')
    with pytest.raises(DataError, match=r"^data.manifest: could not read .*bad\.jsonl: "):
        read_files([tmp_path / "bad.jsonl"], "data.manifest")
    with pytest.raises(DataError, match=r"^data.csv: no such file: .*gone\.csv$"):
        check_table(tmp_path / "gone.csv", IMAGE_TABLE_FILES, "data.csv")
    (tmp_path / "t.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"unsupported file type '.parquet'; use one of .csv, .json, .jsonl, .tsv$"):
        check_table(tmp_path / "t.parquet", IMAGE_TABLE_FILES, "data.csv")
