"""The objective interface: everything the trainer needs to know about a method.

An objective joins a model with its loss (as open_clip's task objects and fairseq2's train units
do): it collates samples into batches (in DataLoader workers), turns a batch into named losses and
metrics, summarises eval metrics, and saves the final model in its ecosystem's format. The trainer
stays modality-agnostic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from multissl.metrics import Mean

Batch = dict[str, torch.Tensor]
StepOutput = dict[str, "torch.Tensor | Mean"]


class Objective:
    """Base class; subclasses set ``self.model`` and implement ``collate`` and ``compute``."""

    name: str = "objective"
    model: nn.Module
    best_metric: str = ""
    """The eval metric that picks the exported model (fine-tuning tasks); empty = the last model."""

    def collate(self, samples: list[dict[str, Any]], generator: torch.Generator) -> Batch:
        """Samples -> batch. ``generator`` is seeded per batch: use it for all randomness."""
        raise NotImplementedError

    def collate_eval(self, samples: list[dict[str, Any]], generator: torch.Generator) -> Batch:
        return self.collate(samples, generator)

    def compute(self, model: nn.Module, batch: Batch) -> StepOutput:
        """Forward a batch through ``model`` (possibly DDP-wrapped); return ``{"loss": ..., **metrics}``.

        In eval mode it may add ``"predictions"``: one JSON-able dict per example, which the trainer
        gathers and writes to ``predictions.jsonl`` for the exported model."""
        raise NotImplementedError

    def count(self, batch: Batch) -> dict[str, float]:
        """Units of work in a batch: ``samples`` and any others (``tokens``, ``audio_seconds``);
        each is logged as ``throughput/<unit>_per_s``. Every batch must report the same units.
        Units named ``skipped_*`` (bad inputs the collator dropped) are logged as running totals over
        all workers and processes (``data/<unit>``) instead of rates."""
        first = next(iter(batch.values()))
        return {"samples": int(first.shape[0])}

    def summarize(self, metrics: dict[str, float]) -> dict[str, float]:
        """Derived eval metrics (e.g. perplexity from loss)."""
        return metrics

    def on_step_end(self, step: int) -> dict[str, float]:
        """Called after every optimizer step (annealing schedules); returns values to log."""
        return {}

    def on_log(self, metrics: dict[str, float], step: int, warmup_steps: int) -> str | None:
        """Inspect the logged training means; a returned string is printed and logged as a warning."""
        return None

    def on_evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Extra eval outputs, e.g. generated text samples (main process only)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Objective state that must survive a resume (e.g. a temperature schedule)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def export(self, model: nn.Module) -> nn.Module:
        """The module users get: ``model`` minus any training-only wrapper."""
        return model

    def save_pretrained(self, model: nn.Module, output_dir: Path) -> None:
        """Write the final (exported) model where its ecosystem loads it from."""
        raise NotImplementedError

    def probe_inputs(self) -> dict[str, Any] | None:
        """What a frozen-feature probe of this model needs: ``{"modality", "tokenizer" | "preprocess" |
        "feature_extractor"}``; None when the model has no encoder to probe."""
        return None

    def model_card_info(self) -> dict[str, Any]:
        """Facts for the model card: library, pipeline tag, tags, how to load."""
        return {}
