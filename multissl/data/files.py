"""Finding input files: what every data source (text, audio, images) does the same way."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from multissl.errors import DataError


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
                raise DataError(f"{what}: {p}: unsupported file type {p.suffix!r}; use one of {', '.join(exts)}")
            out.append(p)
        else:
            raise DataError(f"{what}: no such file or folder: {p}")
    return out
