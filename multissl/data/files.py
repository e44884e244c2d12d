"""Finding and reading input files: what every data source (text, audio, images) does the same way."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from multissl.errors import DataError, first_line

BUILDERS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
            ".txt": "text", ".text": "text"}
"""The `datasets` builder that reads each file type; the sets below say which types a source takes."""
TABLE_FILES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
"""Labelled tables: text classification and probe files."""
TEXT_FILES = (*TABLE_FILES, ".txt", ".text")
"""Text corpora: tables with a text column, or plain text."""
MANIFEST_FILES = TABLE_FILES
"""Audio manifests: tables with a path column."""
IMAGE_TABLE_FILES = (".csv", ".tsv", ".jsonl", ".json")
"""Image-caption tables: open_clip-style CSVs and imagefolder metadata (which is never parquet here)."""
AUDIO_FILES = (".wav", ".flac", ".ogg", ".mp3")


def _unsupported(what: str, path: Path, extensions: Iterable[str]) -> DataError:
    shown = ", ".join(sorted(extensions))
    return DataError(f"{what}: {path}: unsupported file type {path.suffix!r}; use one of {shown}")


def expand_files(paths: list[str], extensions: Iterable[str], what: str = "data.files") -> list[Path]:
    """Files named directly, or found recursively (sorted) in named folders, with one of
    ``extensions``; a missing path, an empty folder or a wrong type is a one-line error naming it."""
    exts = sorted({e.lower() for e in extensions})
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts)
            if not found:
                raise DataError(f"{what}: folder {p} holds no {'/'.join(exts)} files")
            out.extend(found)
        elif p.is_file():
            if p.suffix.lower() not in exts:
                raise _unsupported(what, p, exts)
            out.append(p)
        else:
            raise DataError(f"{what}: no such file or folder: {p}")
    return out


def check_table(path: Path, extensions: Iterable[str], what: str) -> None:
    """A table named on its own (a manifest, a CSV) must be a file of one of ``extensions``."""
    if not path.is_file():
        raise DataError(f"{what}: no such file: {path}")
    if path.suffix.lower() not in extensions:
        raise _unsupported(what, path, extensions)


def builder_of(files: Sequence[Path], what: str) -> str:
    """The one `datasets` builder that reads all of ``files``: one kind of file per source."""
    builders = {BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        kinds = ", ".join(sorted({f.suffix for f in files}))
        raise DataError(f"{what}: mixes file types ({kinds}); use one kind per corpus")
    return builders.pop()


def read_files(files: Sequence[Path], what: str, *, streaming: bool = False, tabs: bool | None = None,
               **kwargs: Any) -> Any:
    """``datasets.load_dataset(builder, data_files=files)``'s one split, read failures named by file.
    CSVs are tab-separated when every file is a .tsv, or as ``tabs`` says (open_clip's CSVs may be)."""
    import datasets

    builder = builder_of(files, what)
    if tabs is None:
        tabs = builder == "csv" and all(f.suffix.lower() == ".tsv" for f in files)
    if tabs:
        kwargs["sep"] = "\t"
    with naming_bad_files(files, what):
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                     streaming=streaming, **kwargs)


def _first_undecodable(files: Sequence[Path], chunk: int = 1 << 20) -> tuple[Path, int] | None:
    """The first file (and byte offset) that is not UTF-8, to name it in the error.

    Only called after a load failed, so a healthy corpus is never read twice.
    """
    import codecs

    for f in files:
        if f.suffix.lower() == ".parquet":
            continue
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with f.open("rb") as fh:
            while True:
                block = fh.read(chunk)
                try:
                    decoder.decode(block, final=not block)
                except UnicodeDecodeError as err:
                    return f, offset + err.start
                if not block:
                    break
                offset += len(block)
    return None


@contextlib.contextmanager
def naming_bad_files(files: Sequence[Path], what: str) -> Iterator[None]:
    """Turn a failure while reading ``files`` into one line that names the culprit.

    Bad bytes surface late and in many forms (the text builder raises while generating, Arrow's
    JSON reader keeps them and Python fails on first access), so the files are scanned for
    non-UTF-8 content only once something has failed.
    """
    try:
        yield
    except DataError:
        raise
    except Exception as err:
        bad = _first_undecodable(files)
        if bad:
            raise DataError(f"{bad[0]}: not valid UTF-8 (first bad byte at offset {bad[1]}); "
                            "re-encode it as UTF-8") from None
        msg = first_line(err)
        raise DataError(f"{what}: could not read {', '.join(map(str, files[:3]))}: {msg}") from None


def cache_root() -> Path:
    """Where the embedded corpora are built: ``$MULTISSL_CACHE``, else ``~/.cache/multissl``."""
    import os

    return Path(os.environ.get("MULTISSL_CACHE") or Path.home() / ".cache" / "multissl").expanduser()


def build_once(final: Path, is_built: Callable[[Path], bool], build: Callable[[Path], object]) -> None:
    """Build a corpus folder once: into a temporary sibling, then renamed into place, so a reader
    never sees half a corpus. A stale folder is moved aside first; a concurrent builder that got
    there first wins."""
    import contextlib
    import os
    import shutil
    import tempfile

    if is_built(final):
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.build."))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is not a secret
    try:
        build(tmp)
        if final.exists():
            if is_built(final):
                return
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old."))
            os.replace(final, old)  # onto an empty folder: allowed, and atomic
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_built(final):
                raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
