"""Metric values an objective returns, their accumulation, and the JSONL log.

An objective returns plain scalar tensors (averaged over batches) or ``Mean(total, count)`` for
values that must be weighted by how many items they cover (tokens, masked frames, pairs), so that
the eval loss is exact whatever the batch and process split.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multissl.full_disk import no_space_as_output_error


@dataclass
class Mean:
    """A weighted mean kept as ``total / count`` so it can be summed over batches and processes."""

    total: torch.Tensor
    count: torch.Tensor | float

    @property
    def value(self) -> torch.Tensor:
        count = self.count if isinstance(self.count, torch.Tensor) else torch.tensor(float(self.count))
        return self.total / count.clamp_min(1e-12).to(self.total.device)


def scalar(value: torch.Tensor | Mean) -> torch.Tensor:
    """The tensor a metric stands for (a Mean's ratio)."""
    return value.value if isinstance(value, Mean) else value


class MetricSums:
    """Running ``(total, count)`` per metric name, reduced across processes in one collective.

    Each name keeps one 2-element tensor on the values' device, summed into in place: no host sync
    a step, and no tensor kept a batch. (Keeping one small tensor a batch until the log, as this
    class once did, pinned the CPU allocator's heap between steps: peak RSS rose ~10 MB a step over
    a 25-step log window on the tiny SimCLR preset and fell back at each log.)"""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}

    def add(self, metrics: dict[str, Any]) -> None:
        for name, value in metrics.items():
            if isinstance(value, Mean):
                total, count = value.total.detach().float(), value.count
            elif isinstance(value, torch.Tensor):
                total, count = value.detach().float(), 1.0
            elif isinstance(value, (int, float)):
                total, count = torch.tensor(float(value)), 1.0
            else:
                continue
            count_t = count.detach().float() if isinstance(count, torch.Tensor) else torch.tensor(float(count))
            pair = torch.stack([total.reshape(()), count_t.to(total.device)])
            held = self._sums.get(name)
            if held is None:
                self._sums[name] = pair
            elif held.device == pair.device:
                held.add_(pair)
            else:  # restored from a checkpoint on the CPU: moves to the values' device once
                self._sums[name] = held.to(pair.device) + pair

    def global_sums(self, accelerator: Any | None) -> dict[str, list[float]]:
        """Sums over all processes (kept pending), so a resumed run logs the same window averages."""
        names = sorted(self._sums)
        distributed = accelerator is not None and accelerator.num_processes > 1
        if distributed:  # a process with no batches (uneven eval split) must still join the reduce
            from accelerate.utils import gather_object

            names = sorted({n for group in gather_object([names]) for n in group})
        if not names:
            return {}
        device = accelerator.device if accelerator is not None else torch.device("cpu")
        zero = torch.zeros(2)
        stacked = torch.stack([
            self._sums[n].to(device) if n in self._sums else zero.to(device) for n in names
        ])
        if distributed:
            stacked = accelerator.reduce(stacked, reduction="sum")
        return dict(zip(names, stacked.cpu().tolist()))

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self._sums = {n: torch.tensor(tc, dtype=torch.float32) for n, tc in state.items()}

    def reduce(self, accelerator: Any | None) -> dict[str, float]:
        """Sum over batches (and processes, when an accelerator is given); return the means."""
        sums = self.global_sums(accelerator)
        self._sums.clear()
        return {n: t / c if c > 0 else float("nan") for n, (t, c) in sums.items()}


def finite_or_none(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


class JsonlWriter:
    """Appends one JSON object a line; on resume, drops lines past the resumed step."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
        tmp = self.path.with_name(f".{self.path.name}.partial")  # a full disk must not cost the old lines
        with no_space_as_output_error(self.path):
            try:
                tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in record.items()}
        with no_space_as_output_error(self.path), self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
