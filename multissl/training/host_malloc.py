"""Keep freed host memory mapped between CPU training steps (glibc's malloc).

Every training step allocates and frees the same activations and gradients. By default glibc
hands large freed blocks back to the kernel: chunks above ``M_MMAP_THRESHOLD`` are unmapped on
free, and the heap's free top is trimmed once it exceeds ``M_TRIM_THRESHOLD`` (both adjust
themselves, up to 32 / 64 MiB). The next step then takes a page fault, and the kernel zeroes a
page, for every 4 KiB it touches again. Whether a given loop trips the trim depends on where
long-lived objects happen to sit in the heap, so two loops doing the same arithmetic can differ by
10-20% (the tiny CLM preset: 16-28k minor faults a step in the trainer against 4k in a bare loop).
Fixing both thresholds high removes the faults for both (about 400 a step).

The cost is that up to ``TRIM_THRESHOLD`` of freed memory stays mapped after a peak; the peak
itself (what decides whether a run fits) does not change. Under jemalloc/tcmalloc/mimalloc
(``LD_PRELOAD``), or when the user set glibc's own knobs, nothing is touched.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
"""glibc's ceiling for it on 64-bit (HEAP_MAX_SIZE / 2): blocks larger than this are always mapped."""
TRIM_THRESHOLD = 2**30

_USER_KNOBS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_done: bool | None = None


def is_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def why_not_tuned(environ: dict[str, str] | None = None) -> str:
    """Why the thresholds are left alone here, or "" when they can be set."""
    env = os.environ if environ is None else environ
    if not is_glibc():
        return "not glibc"
    user = [k for k in _USER_KNOBS if k in env]
    if user or "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return f"set by the user ({', '.join(user) or 'GLIBC_TUNABLES'})"
    preload = env.get("LD_PRELOAD", "")
    other = next((name for name in _OTHER_ALLOCATORS if name in preload), None)
    if other:
        return f"{other} is preloaded"
    return ""


def keep_freed_host_memory() -> bool:
    """Fix glibc's trim and mmap thresholds high, once a process; True when they are set."""
    global _done
    if _done is None:
        _done = False
        if not why_not_tuned():
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
