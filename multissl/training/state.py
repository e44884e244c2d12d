"""Where training stands (saved with every checkpoint) and what ``fit`` returns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Where training stands; saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    seen: dict[str, float] = field(default_factory=dict)
    """Every unit the objective counts (samples, tokens, audio_seconds, skipped_*), over all processes."""
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    train_seconds: float = 0.0
    log_window: dict[str, list[float]] = field(default_factory=dict)
    """Metric sums since the last log line (over processes), so logs after a resume match."""
    rank_positions: list[list[int]] = field(default_factory=list)
    """(epoch, batch_in_epoch) of every process: streamed shards can be consumed unevenly."""
    skip_ids: dict[str, list[int]] = field(default_factory=dict)
    """Per ``skipped_*`` unit, the ids of the distinct bad inputs counted (see `multissl.training.skips`)."""
    best: dict[str, Any] = field(default_factory=dict)
    """The best evaluation so far by ``best_metric``: ``{"step", "metric", "value", "metrics"}``."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainerState:
        """Keys of older versions (``samples_seen``, ``tokens_seen``: now in ``seen``) are dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass
class FitResult:
    state: TrainerState
    first_train_loss: float | None
    final_metrics: dict[str, float]
    history: list[dict[str, Any]]
    model: nn.Module | None = None
    """The model at the last step, unwrapped. The exported output_dir/model is the best evaluated
    one when a best metric is tracked (see ``best_step``)."""
    best_step: int | None = None
    """The step whose model was exported, when a best metric picked it."""
    best_metric: str = ""
    """The eval metric that picked it (the objective's headline metric for fine-tuning tasks)."""
    train_size: int | None = None
    """Training examples (None for streams)."""
    lower_is_better: bool = False
    """Whether a smaller ``best_metric`` is better, as the objective says."""


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one has no trainer_state.json)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))
