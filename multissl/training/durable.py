"""Flushing a finished checkpoint to the disk before it is renamed into place.

The rename makes a checkpoint appear whole or not at all to a process that crashes; it does not
make it survive a power cut or a kernel crash. Without fsync the file system may commit the rename
before the file contents, and the newest checkpoint comes back as empty or truncated files. So
every file and folder of the checkpoint is flushed before the rename, and the parent folder after
it (the rename itself lives in the parent's entry list)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush one file or folder. File systems that cannot fsync a folder (some network ones) are
    left at what they offer: the error would stop a run for a guarantee they do not give."""
    folder = path.is_dir()
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    try:
        with contextlib.suppress(OSError) if folder else contextlib.nullcontext():
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file below ``root``, then every folder, deepest first, then ``root`` itself."""
    folders = []
    for folder, _subdirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        folders.append(Path(folder))
    for folder in reversed(folders):
        fsync_path(folder)
