"""Finding and reading input files: what every data source (text, audio, images) does the same way."""

from __future__ import annotations

import codecs
import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from multissl.errors import DataError, first_line, root_cause

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
    with naming_bad_files(files, what, sep=kwargs.get("sep")), quiet_builders():
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                   streaming=streaming, **kwargs)
        if builder == "json" and not streaming:  # Arrow's JSON reader keeps bad UTF-8 that Python trips on later
            ds.data.table.validate(full=True)
        return ds


@contextlib.contextmanager
def quiet_builders() -> Iterator[None]:
    """Silence `datasets`' file builders while they read: on a bad file they log their own "Failed to
    load JSON from file ..." before raising, and the one-line error raised instead already names the
    file, the line and the reason."""
    import logging

    logger = logging.getLogger("datasets.packaged_modules")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
"""Byte-order marks and the codec each one names (UTF-32's first: its LE mark starts with UTF-16's)."""


def bom_encoding(head: bytes) -> str | None:
    """The codec a file's byte-order mark names (``head``: its first bytes), else None.

    A BOM is the one encoding signature that is not a guess, so such files are decoded by it; a file
    without one is read as UTF-8 or reported, never decoded by a guessed legacy code page.
    """
    for bom, encoding in BOMS:
        if head.startswith(bom):
            return encoding
    return None


def file_encoding(path: Path) -> str:
    """How ``path`` is decoded: by its byte-order mark, else as UTF-8."""
    with path.open("rb") as fh:
        return bom_encoding(fh.read(4)) or "utf-8"


def first_undecodable(path: Path, encoding: str = "utf-8", chunk: int = 1 << 20) -> int | None:
    """The byte offset of the first byte of ``path`` that ``encoding`` cannot decode, else None."""
    decoder, offset = codecs.getincrementaldecoder(encoding)(), 0
    with path.open("rb") as fh:
        while True:
            block = fh.read(chunk)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the last block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                return offset - pending + err.start
            if not block:
                return None
            offset += len(block)


def _first_undecodable(files: Sequence[Path], chunk: int = 1 << 20) -> tuple[Path, int, str, str] | None:
    """The first file that does not decode as it is read, to name it in the error: ``(file, byte
    offset, codec tried, codec its byte-order mark names)``. Plain text is read by its byte-order mark
    (see `multissl.data.text`), tables as UTF-8 (what `datasets` reads them as).

    Only called after a load failed, so a healthy corpus is never read twice.
    """
    for f in files:
        if f.suffix.lower() == ".parquet" or not f.is_file():
            continue
        marked = file_encoding(f)
        encoding = marked if f.suffix.lower() in (".txt", ".text") else "utf-8-sig"
        offset = first_undecodable(f, encoding, chunk)
        if offset is not None:
            return f, offset, encoding, marked
    return None


def _json_line_error(path: Path) -> str | None:
    """``line N: reason`` for the first line of a JSON Lines file that is not a JSON object (lines
    numbered from 1, as an editor shows them), or a whole-document error for a .json file that is
    one JSON document; None when the file parses."""
    import json

    first_content = None
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8", errors="replace").strip()
            if not line:
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                if first_content is None and path.suffix.lower() == ".json":
                    return _json_document_error(path)
                return f"line {number}: {err.msg} (column {err.colno})"
            first_content = first_content or number
            if not isinstance(value, dict) and not (first_content == number and path.suffix.lower() == ".json"):
                return f"line {number}: not a JSON object (a {type(value).__name__})"
    return None


def _json_document_error(path: Path) -> str | None:
    """``line N: reason`` where a .json file holding one JSON document stops parsing, else None."""
    import json

    try:
        json.loads(path.read_text(encoding="utf-8-sig", errors="replace"))
    except json.JSONDecodeError as err:
        return f"line {err.lineno}: {err.msg} (column {err.colno})"
    return None


def _csv_error(path: Path, sep: str | None) -> str | None:
    """The CSV reader's own first line (it names the line) for a table `datasets` could not read."""
    import pandas as pd

    try:
        for _ in pd.read_csv(path, sep=sep or ("\t" if path.suffix.lower() == ".tsv" else ","), chunksize=100_000):
            pass
    except Exception as err:
        return first_line(err)
    return None


def _parquet_error(path: Path) -> str | None:
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(path).schema_arrow  # noqa: B018 - reading the footer is the check
    except Exception as err:
        return first_line(err)
    return None


def parse_error(files: Sequence[Path], sep: str | None = None) -> tuple[Path, str] | None:
    """The first of ``files`` that does not parse as its type says, and why (``line N: reason`` where
    the format has lines). Called only after `datasets` failed, whose own message names neither the
    file nor the line."""
    for f in files:
        if not f.is_file():
            continue
        builder = BUILDERS.get(f.suffix.lower())
        if builder == "json":
            why = _json_line_error(f)
        elif builder == "csv":
            why = _csv_error(f, sep)
        elif builder == "parquet":
            why = _parquet_error(f)
        else:
            why = None
        if why:
            return f, why
    return None


def cause_line(err: BaseException) -> str:
    """The most specific first line of a (wrapped) library error: its root cause's, unless that says
    nothing (`datasets` wraps the reason in "An error occurred while generating the dataset")."""
    cause = root_cause(err)
    text = first_line(cause)
    return text if text != type(cause).__name__ else first_line(err)


def blame(files: Sequence[Path], what: str, sep: str | None = None) -> DataError | None:
    """After a read of ``files`` failed: a one-line error naming the file and byte that does not
    decode, or the file and line that does not parse; None when every file looks fine."""
    bad = _first_undecodable(files)
    if bad:
        path, offset, encoding, marked = bad
        shown = "UTF-8" if encoding.startswith("utf-8") else encoding.upper()
        marked_note = f", it starts with a {marked.upper()} byte-order mark" if marked != encoding and marked != "utf-8" else ""
        return DataError(f"{path}: not valid {shown} (first bad byte at offset {offset}{marked_note}); "
                         "re-encode it as UTF-8")
    located = parse_error(files, sep)
    if located:
        return DataError(f"{what}: could not read {located[0]}: {located[1]}")
    return None


@contextlib.contextmanager
def naming_bad_files(files: Sequence[Path], what: str, sep: str | None = None) -> Iterator[None]:
    """Turn a failure while reading ``files`` into one line that names the culprit (`blame`), else the
    library's innermost reason.

    Bad bytes surface late and in many forms (the text builder raises while generating, Arrow's
    JSON reader keeps them and Python fails on first access), and `datasets` wraps parse errors in
    "An error occurred while generating the dataset", so only once something has failed are the
    files scanned: for bytes that do not decode, then for the first line that does not parse.
    """
    try:
        yield
    except DataError:
        raise
    except Exception as err:
        named = blame(files, what, sep)
        if named is not None:
            raise named from None
        raise DataError(f"{what}: could not read {', '.join(map(str, files[:3]))}: {cause_line(err)}") from None


def write_skip_list(output_dir: str | Path, name: str, lines: Sequence[str]) -> Path | None:
    """``output_dir/data/<name>``: every input skipped as bad, one ``path<TAB>reason`` a line, so a
    run's drops can be reviewed after the warnings scrolled away. Removed when nothing was skipped
    (a stale list from an earlier run would name files that are now fine). Returns the path written."""
    path = Path(output_dir) / "data" / name
    if not lines:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    tmp.replace(path)
    return path


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


class SkipWarnings:
    """A collator's warnings about the bad files it skips: the first ``limit`` files named, each
    once, so a file met again (the next epoch, the next evaluation) is neither named again nor
    counted twice in "N so far" (which is per DataLoader worker; the run's total is the trainer's)."""

    def __init__(self, what: str, limit: int = 3) -> None:
        self.what, self.limit = what, limit
        self.named: list[str] = []

    def skip(self, err: Exception) -> None:
        message = str(err)
        if len(self.named) >= self.limit or message in self.named:
            return
        self.named.append(message)
        print(f"warning: skipping bad {self.what} ({len(self.named)} so far in this worker): {message}", flush=True)
