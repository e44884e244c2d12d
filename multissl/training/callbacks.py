"""Callbacks: work a recipe attaches to a run (probes, the model card, the Hub push) without the
trainer knowing what it is. Each hook runs on the main process only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from multissl.training.objective import Objective
    from multissl.training.state import TrainerState
    from multissl.training.trainer import Trainer


@dataclass
class Export:
    """The exported model and what was measured of it, for the callbacks that describe or ship it."""

    model_dir: Path
    output_dir: Path
    state: TrainerState
    final_metrics: dict[str, Any]
    run_config: Any
    metrics_path: Path


class Callback:
    def on_evaluate(self, trainer: Trainer, objective: Objective, model: nn.Module) -> dict[str, Any]:
        """After each evaluation, with the exported (unwrapped) model; returns records to log under
        their full names (``probe/linear_acc``). Runs locally: no collectives."""
        return {}

    def on_export(self, trainer: Trainer, objective: Objective, export: Export) -> None:
        """The final model is in ``export.model_dir``; the other processes wait for this hook."""

    def on_fit_end(self, trainer: Trainer, objective: Objective, export: Export) -> None:
        """After every process is done (a slow upload holds up no one)."""
