"""A full disk told apart from a bug when an output file (checkpoint, metrics, model) is written: one
line naming the file and the checkpoint to resume from, instead of torch's "unexpected pos"."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from multissl.errors import OutputError

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded",
                  f"(os error {errno.ENOSPC})", f"(os error {errno.EDQUOT})")  # the last two: Rust (safetensors)
_TORCH_WRITER_TEXT = ("inline_container.cc", "PytorchStreamWriter")
"""torch.save's zip writer loses the errno: ENOSPC comes out as ``[enforce fail at
inline_container.cc:672] . unexpected pos 576 vs 534`` (from ``basic_ios::clear: iostream error``)."""
_PROBE_BYTES = 1 << 20


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_out_of_space(err: BaseException, folder: str | Path | None = None) -> bool:
    """Whether ``err`` (or what it was raised from) is the disk or the quota being full.

    An OSError says so by its errno, safetensors by its message; torch's serializer says nothing
    useful, so for its errors the filesystem of ``folder`` (where the file was being written) is
    checked: almost no space left, or a small probe write failing with ENOSPC/EDQUOT. Any other
    error (a bug, a broken file) is not taken for a full disk."""
    torch_writer = False
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
            return True
        text = str(e)
        if any(marker in text for marker in _NO_SPACE_TEXT):
            return True
        torch_writer = torch_writer or any(marker in text for marker in _TORCH_WRITER_TEXT)
    return torch_writer and folder is not None and filesystem_is_full(folder)


def filesystem_is_full(folder: str | Path) -> bool:
    """Whether the filesystem holding ``folder`` (or its nearest existing parent) takes no more
    data: under 1 MiB free for this user, or a 1 MiB probe file fails (quotas do not show in the
    free space). The probe is removed."""
    here = Path(folder).absolute()
    while not here.is_dir() and here != here.parent:
        here = here.parent
    try:
        if shutil.disk_usage(here).free < _PROBE_BYTES:
            return True
        fd, probe = tempfile.mkstemp(prefix=".space-probe-", dir=here)
    except OSError as err:
        return err.errno in NO_SPACE_ERRNOS
    try:
        os.write(fd, bytes(_PROBE_BYTES))
        os.fsync(fd)  # filesystems that allocate late report a full disk here
        return False
    except OSError as err:
        return err.errno in NO_SPACE_ERRNOS
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def no_space_error(path: str | Path, checkpoint: str | Path | None = None) -> OutputError:
    """The one-line error for a write that ran out of space: the file, then what is intact and how
    to go on. ``checkpoint``: the newest complete checkpoint (None: none yet, or not known here)."""
    if checkpoint is not None:
        then = f"the newest complete checkpoint {checkpoint} is intact: free space and run the same command again to resume"
    else:
        then = "free space and run the same command again (it resumes from the newest complete checkpoint, if any)"
    return OutputError(f"no space left on device while writing {path}; {then}")


@contextlib.contextmanager
def no_space_as_output_error(path: str | Path, checkpoint: str | Path | None = None) -> Iterator[None]:
    """Writes to ``path`` inside this block fail with `no_space_error` when the disk is full;
    other errors pass through unchanged."""
    try:
        yield
    except Exception as err:
        if is_out_of_space(err, Path(path).parent):
            raise no_space_error(path, checkpoint) from None
        raise
