"""Per-step schedules: pure functions of the step, so a resumed run recomputes them exactly."""

from __future__ import annotations

import math


def lr_factor(kind: str, step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The lr multiplier at ``step`` (0-based): linear warm-up, then cosine/linear decay to
    ``min_ratio`` (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * (1 - progress)


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """``start`` at step 0 to ``end`` at ``total_steps - 1`` along half a cosine (teacher momentum
    0.996 -> 1, weight decay 0.04 -> 0.4, teacher temperature); ``end`` past the last step."""
    if total_steps <= 1:
        return end
    progress = min(1.0, step / (total_steps - 1))
    return end - (end - start) * 0.5 * (1 + math.cos(math.pi * progress))
