"""Opening a ``data.dataset``: a Hub id, or a folder written by ``save_to_disk``, the same way for
every modality, so a local folder saved from a `DatasetDict` works wherever a Hub id does."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from multissl.data.files import TEXT_FILES, blame, cause_line, quiet_builders
from multissl.errors import DataError

if TYPE_CHECKING:  # datasets loads inside the functions: importing this module stays cheap
    from datasets import Dataset, IterableDataset

MAX_DISK_SHARDS = 8  # a streamed save_to_disk folder is cut into at most this many shards


def saved_kind(folder: Path) -> str | None:
    """``"dataset"`` or ``"dataset_dict"`` for a folder written by ``save_to_disk``, else None."""
    if (folder / "state.json").is_file():
        return "dataset"
    if (folder / "dataset_dict.json").is_file():
        return "dataset_dict"
    return None


def looks_like_path(name: str) -> bool:
    """A name meant as a local folder: Hub ids are ``name`` or ``owner/name``, never absolute,
    relative to ``.`` or ``~``, nor with more than one slash."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _from_disk(folder: Path, name: str, split: str, where: str) -> Any:
    """The split of a save_to_disk folder; a `DatasetDict` without it is an error naming its splits."""
    import datasets

    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{where}={name!r}: {folder} has no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    return ds


def open_dataset(name_or_path: str, *, split: str, config_name: str | None = None, streaming: bool = False,
                 where: str = "data.dataset") -> Dataset | IterableDataset:
    """One split as a `datasets.Dataset` (an `IterableDataset` when ``streaming``), from a save_to_disk
    folder (of a `Dataset` or a `DatasetDict`) or anything `datasets.load_dataset` reads; every
    failure is a one-line `DataError` naming ``where`` and the source."""
    import datasets

    local = Path(name_or_path).expanduser()
    if not local.exists() and looks_like_path(name_or_path):
        raise DataError(f"{where}={name_or_path!r}: no such dataset folder: {local}")
    try:
        if local.is_dir() and saved_kind(local):
            ds = _from_disk(local, name_or_path, split, where)
            if streaming:  # no more shards than rows: to_iterable_dataset refuses that
                return ds.to_iterable_dataset(num_shards=max(1, min(len(ds), MAX_DISK_SHARDS)))
            return ds
        with quiet_builders():
            return datasets.load_dataset(name_or_path, config_name or None, split=split, streaming=streaming)
    except DataError:
        raise
    except Exception as err:
        named = blame(_data_files(local), f"{where}={name_or_path!r}") if local.is_dir() else None
        if named is not None:  # datasets said "An error occurred while generating the dataset"
            raise named from None
        raise DataError(f"{where}={name_or_path!r} split {split!r}: {cause_line(err)}") from None


def _data_files(folder: Path) -> list[Path]:
    """The text and table files of a local dataset folder (imagefolder metadata included), to find a broken one."""
    return sorted(f for f in folder.rglob("*") if f.suffix.lower() in TEXT_FILES and f.is_file())
