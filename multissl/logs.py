"""Keeping library chatter off the console, which belongs to multissl's progress bar and results."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """open_clip logs through the root logger; keep its warnings out of the console while building."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
