"""One run per output folder, and output folders that can be used at all.

A run claims its output folder with an advisory lock (``flock``) on ``<output_dir>/.multissl.lock``
before it writes anything there; a second run on the same folder refuses with one line naming the
folder and the run that holds it, and ``multissl push`` refuses a folder a run is still writing.
The kernel drops the lock when the holder's process ends, however it ends (kill -9 included), so
a crashed run never blocks the next one; the lock file itself stays (deleting it would let two
runs lock two different files of the same name) and only says who held it last.

Lifetime: `multissl.training.Trainer` claims its folder when it is made (rank 0 only) and releases
it at the end of ``fit``; a Trainer that never finishes holds it until it is garbage-collected or
the process ends. Within one process a new claim of a folder the process already holds takes the
lock over from the earlier claim instead of refusing: a process runs one trainer at a time (the
demo, lift, a notebook re-running a cell after an error), and flock locks belong to an open file
description, so a second ``open`` + ``flock`` in the same process would otherwise block itself.

Before the lock, `check_output_folder` turns a folder that cannot be used (a file, a path under a
file, a device, /proc, a read-only or not writable folder) into an `OutputError` naming the path
and the reason, before any work starts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

from multissl.errors import OutputError

LOCK_FILE = ".multissl.lock"

_held: dict[tuple[int, int], RunLock] = {}
"""This process's claims, by the lock file's (device, inode): a second claim takes the first over."""


class RunLock:
    """A claimed output folder; ``release()`` (or leaving the ``with`` block) gives it back."""

    def __init__(self, folder: Path, fd: int | None, key: tuple[int, int] | None) -> None:
        self.folder, self._fd, self._key, self._pid = folder, fd, key, os.getpid()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlock and close. Idempotent; a no-op for a claim another claim of this process took over."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._key is not None and _held.get(self._key) is self:
            del _held[self._key]
        if os.getpid() == self._pid:  # never unlock the parent's lock from a forked child
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)  # also drops it for any fd a child inherited
        with contextlib.suppress(OSError):
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a trainer dropped without finishing gives the folder back
        with contextlib.suppress(Exception):  # at interpreter exit modules may be gone: the kernel unlocks
            self.release()


def _drop_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies of the lock files, so the lock ends
    with the process that took it; closing a shared descriptor does not unlock it."""
    for lock in list(_held.values()):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_drop_in_child)


# ------------------------------------------------------------------------------ usable folders
def _kind(path: Path) -> str:
    return "a file" if path.is_file() else "not a folder (a device or other special file)"


def _unusable(path: Path, reason: str, option: str) -> OutputError:
    return OutputError(f"output folder {path} cannot be used: {reason}; use another {option}")


def _not_writable_reason(folder: Path) -> str:
    with contextlib.suppress(OSError):
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "it is on a read-only file system"
    return "it is not writable (permission denied)"


def _os_reason(err: OSError) -> str:
    if err.errno == errno.EROFS:
        return "it is on a read-only file system"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"it is not writable ({err.strerror.lower() if err.strerror else 'permission denied'})"
    if err.errno == errno.ENOSPC:
        return "no space left on the device"
    return f"cannot write in it ({err.strerror or type(err).__name__})"


def check_output_folder(path: str | Path, option: str = "trainer.output_dir") -> Path:
    """Make ``path`` (and its parents) a folder this process can write, or raise `OutputError` with
    one line naming the path and why not (``option`` is the setting the user should change).

    Nothing is created when the folder cannot be used: every failure is found before ``mkdir`` or
    by a ``mkdir`` that failed."""
    folder = Path(path).expanduser()
    try:
        _check(folder, option)
    except OSError as err:  # a parent that cannot even be looked at (permission denied)
        raise _unusable(folder, _os_reason(err), option) from None
    return folder


def _check(folder: Path, option: str) -> None:
    if folder.is_symlink() and not folder.exists():
        raise _unusable(folder, f"it is a broken symbolic link (to {os.readlink(folder)})", option)
    if folder.exists() and not folder.is_dir():
        raise _unusable(folder, f"it is {_kind(folder)}", option)
    for parent in folder.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise _unusable(folder, f"{parent} is {_kind(parent)}", option)
            break
    if not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            where = next((p for p in folder.absolute().parents if p.is_dir()), None)
            reason = _os_reason(err)
            if where is not None and err.errno != errno.ENOSPC:
                reason = f"cannot create a folder in {where} ({err.strerror or reason})"
            raise _unusable(folder, reason, option) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _unusable(folder, _not_writable_reason(folder), option)


# ------------------------------------------------------------------------------------- the lock
def _command_line() -> str:
    argv = list(sys.argv) or ["python"]
    name = Path(argv[0]).name
    if name == "cli.py" and Path(argv[0]).parent.name == "multissl":  # python -m multissl.cli
        name = "multissl"
    text = " ".join([name, *argv[1:]])
    return text if len(text) <= 160 else text[:157] + "..."


def _write_info(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": _command_line()}
    data = (json.dumps(info) + "\n").encode()
    with contextlib.suppress(OSError):  # who holds it is a courtesy; the lock is what counts
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)


def _describe_holder(lock_file: Path) -> str:
    """``pid 1234 on host, started 2025-01-02 12:01:02: multissl pretrain mlm ...`` from the lock file."""
    info: dict[str, Any] = {}
    for _ in range(25):  # the holder writes its details right after locking: wait for them briefly
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(lock_file.read_text(encoding="utf-8"))
        if info:
            break
        time.sleep(0.02)
    if not isinstance(info, dict) or "pid" not in info:
        return "its details are not known yet"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("started", 0))))
    return f"pid {info['pid']} on {info.get('host', '?')}, started {started}: {info.get('command', '?')}"


def _in_use(folder: Path, lock_file: Path, hint: str) -> OutputError:
    return OutputError(f"{folder} is in use by another run ({_describe_holder(lock_file)}); {hint}")


def claim(output_dir: str | Path, option: str = "trainer.output_dir") -> RunLock:
    """Check ``output_dir`` (see `check_output_folder`) and lock it for this run; raise `OutputError`
    naming the other run when one holds it. Where the file system has no locks, warn and go on."""
    folder = check_output_folder(output_dir, option)
    lock_file = folder / LOCK_FILE
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise _unusable(folder, _os_reason(err), option) from None
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    earlier = _held.get(key)
    if earlier is not None and earlier._fd is not None:  # this process holds it: take it over
        os.close(fd)
        fd, earlier._fd = earlier._fd, None
        lock = _held[key] = RunLock(folder, fd, key)
        _write_info(fd)
        return lock
    for attempt in range(3):  # a moment's grace: `refuse_if_in_use` (a push) holds it for microseconds
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) and attempt < 2:
                time.sleep(0.05)
                continue
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _in_use(folder, lock_file, f"wait for it, stop it, or use another {option}") from None
            print(f"warning: cannot lock {folder} ({err.strerror}); make sure no other run writes there", flush=True)
            return RunLock(folder, None, None)
    _write_info(fd)
    lock = RunLock(folder, fd, key)
    _held[key] = lock
    return lock


def refuse_if_in_use(folder: str | Path, hint: str = "wait for it to finish") -> None:
    """Raise `OutputError` when a run in another process holds ``folder`` (readers such as
    ``multissl push``); this process's own claims, and folders no run ever claimed, pass."""
    folder = Path(folder).expanduser()
    lock_file = folder / LOCK_FILE
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return  # no lock file (or unreadable): no run of this version holds it
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in _held:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _in_use(folder, lock_file, hint) from None
            return
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
