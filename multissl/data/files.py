"""Finding input files: what every data source (text, audio, images) does the same way."""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
