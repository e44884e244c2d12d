"""The objective interface: everything the trainer needs to know about a method.

An objective joins a model with its loss (as open_clip's task objects and fairseq2's train units
do). It hands the trainer a small picklable collator (run in DataLoader workers), turns a batch into
named losses and metrics, declares the units it counts and which metrics are better when lower,
and saves the final model in its ecosystem's format. Methods with teachers, queues and schedules
(BYOL, MoCo, DINO) use the optional hooks: ``setup`` (the run's shape, once), ``param_groups``
(per-group lr/weight-decay multipliers), ``auxiliary_modules`` (trained by no optimizer, kept out
of DDP, checkpointed, identical on every process), ``before_optimizer_step`` (edit gradients) and
``after_optimizer_step`` (EMA updates, only after a real update). The trainer stays modality-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # torch loads with the trainer: the CLI's parser and configs import this module
    import torch
    from torch import nn

    from multissl.metrics import Mean
    from multissl.training.skips import BadInputs

Batch = dict[str, Any]
"""Tensors, lists or tuples of tensors (views of several sizes), and plain values."""
StepOutput = dict[str, "torch.Tensor | Mean"]
Collator = Callable[[list[dict[str, Any]], "torch.Generator"], Batch]
"""``collate(samples, generator) -> batch``; ``generator`` is seeded per batch: use it for all randomness.
It must pickle small (no model inside): DataLoader workers started with spawn unpickle it."""
Modality = Literal["text", "audio", "image"]
LOWER_IS_BETTER = ("loss", "perplexity", "error", "error_rate")


def lower_is_better_by_name(metric: str, names: Sequence[str] = LOWER_IS_BETTER) -> bool:
    """Whether ``metric`` is one of ``names`` or ends with ``_<name>`` (``contrastive_loss``)."""
    return any(metric == m or metric.endswith(f"_{m}") for m in names)


@dataclass(frozen=True)
class TrainContext:
    """The shape of the run, given to ``Objective.setup`` once before the first step."""

    total_steps: int
    steps_per_epoch: int | None
    """Optimizer steps per epoch of this process's data (None for streams)."""
    warmup_steps: int
    world_size: int
    rank: int
    device: torch.device
    gather: Callable[[torch.Tensor], torch.Tensor]
    """All-gather along dim 0 over every process with gradients flowing back to each process's own
    part (identity on one process): negatives for contrastive losses, batch statistics."""


@dataclass
class ParamGroup:
    """Parameters that share lr and weight-decay multipliers (DINO's last layer, SimSiam's predictor).

    The trainer sets ``lr = base_lr(step) x lr_multiplier`` and ``weight_decay = wd(step) x
    wd_multiplier`` every step; vectors (biases, norm weights) never get weight decay.
    ``fixed_lr`` keeps ``base lr x lr_multiplier`` without the schedule (SimSiam's predictor)."""

    params: list[nn.Parameter]
    name: str = "default"
    lr_multiplier: float = 1.0
    wd_multiplier: float = 1.0
    fixed_lr: bool = False


@dataclass
class ModelCardInfo:
    """What the model card says about the exported model and how to load it."""

    method: str
    arch: str = "?"
    size: str = "?"
    parameters: int = 0
    library_name: str | None = None
    pipeline_tag: str | None = None
    usage: str = ""
    """Loading code; ``{repo}`` becomes the folder or Hub id, ``{open_clip_ref}`` open_clip's reference."""
    auto_class: str = "AutoModel"
    card_metrics: tuple[str, ...] = ()
    """Held-out metrics listed in the card's model-index."""
    fine_tuned: bool = False
    base_model: str = ""
    figures: tuple[tuple[str, str], ...] = ()
    """``(file name, caption)`` of pictures the objective saves beside the card (MAE's reconstructions);
    the card shows those that exist."""


class Objective:
    """Base class; subclasses set ``self.model`` and implement ``collator``, ``compute``, ``count``
    and ``save_pretrained``."""

    name: str = "objective"
    model: nn.Module
    best_metric: str = ""
    """The eval metric that picks the exported model (fine-tuning tasks); empty = the last model."""
    modality: Modality | None = None
    """What ``features`` takes: texts, waveforms/paths, or images/paths; None = no encoder to probe."""
    unshardable: str = ""
    """Why FSDP cannot train this objective's model, when it cannot: the trainer refuses with it."""
    broadcast_buffers: bool = True
    """Under DDP, copy rank 0's buffers (batch-norm statistics) to every process before each forward.
    An objective that forwards the model more than once per step (DINO's crops of two sizes) sets
    False: the in-place copy between two forwards would break the first one's backward."""

    # ------------------------------------------------------------------ data
    def collator(self) -> Collator:
        """The training collator: a small picklable object (never a bound method of the objective)."""
        raise NotImplementedError(f"{type(self).__name__} must define collator()")

    def eval_collator(self) -> Collator:
        return self.collator()

    def count(self, batch: Batch) -> dict[str, float | BadInputs]:
        """Units of work in a batch: ``samples`` and any others (``tokens``, ``audio_seconds``);
        each is logged as ``throughput/<unit>_per_s``. Every batch must report the same units.
        Units named ``skipped_*`` (bad inputs the collator dropped) are logged as running totals over
        all workers and processes (``data/<unit>``) instead of rates; report them as
        `multissl.training.skips.BadInputs` (the batch's bad files by id, ``BadInputs.of(batch)``)
        and the trainer counts each file once over the run, whichever process meets it."""
        raise NotImplementedError(f"{type(self).__name__} must declare count(batch)")

    # ------------------------------------------------------------------ steps
    def setup(self, context: TrainContext) -> None:
        """Called once before training with the run's shape (schedules over ``total_steps``)."""

    def compute(self, model: nn.Module, batch: Batch) -> StepOutput:
        """Forward a batch through ``model`` (the same object in training and eval; under several
        processes a DDP wrapper that forwards attribute access to the module); return
        ``{"loss": ..., **metrics}``.

        In eval mode it may add ``"predictions"``: one JSON-able dict per example, which the trainer
        gathers and writes to ``predictions.jsonl`` for the exported model."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        """How the trained parameters are grouped for the optimizer; default: one group."""
        return [ParamGroup([p for p in model.parameters() if p.requires_grad])]

    def auxiliary_modules(self) -> dict[str, nn.Module]:
        """Modules that no optimizer trains (an EMA teacher, a queue of keys): the trainer moves them
        to the device, copies rank 0's values to every process, keeps them out of DDP and of the
        optimizer, and saves them with every checkpoint."""
        return {}

    def before_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Gradients are final (unscaled, clipped, finite): edit them here (DINO freezes its last
        layer for the first epoch). ``step`` is the 0-based index of the update about to happen."""

    def after_optimizer_step(self, model: nn.Module, step: int) -> dict[str, float]:
        """Only after a real update, never after a skipped non-finite step (EMA teachers). ``step``
        counts the updates done so far (1 after the first); returns values to log."""
        return {}

    def on_step_end(self, step: int) -> dict[str, float]:
        """Called after every optimizer step, skipped or not (annealing by step count); returns values to log."""
        return {}

    # --------------------------------------------------------------- metrics
    def lower_is_better(self, metric: str) -> bool:
        """Whether a smaller value of ``metric`` is better (losses, error rates)."""
        return lower_is_better_by_name(metric)

    def summarize(self, metrics: dict[str, float]) -> dict[str, float]:
        """Derived eval metrics (e.g. perplexity from loss)."""
        return metrics

    def on_log(self, metrics: dict[str, float], step: int, warmup_steps: int) -> str | None:
        """Inspect the logged training means; a returned string is printed and logged as a warning."""
        return None

    def on_evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Extra eval outputs, e.g. generated text samples (main process only)."""
        return {}

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Objective state that must survive a resume (e.g. a temperature schedule)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # ---------------------------------------------------------------- export
    def export(self, model: nn.Module) -> nn.Module:
        """The module users get: ``model`` minus any training-only wrapper."""
        return model

    def save_pretrained(self, model: nn.Module, output_dir: Path) -> None:
        """Write the final (exported) model where its ecosystem loads it from."""
        raise NotImplementedError

    def features(self, model: nn.Module, inputs: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """``(len(inputs), dim)`` frozen features of the exported ``model`` for probes and kNN monitors."""
        raise NotImplementedError(f"{type(self).__name__} has no encoder to take features from")

    def model_card(self) -> ModelCardInfo:
        """Facts for the model card: library, pipeline tag, how to load."""
        return ModelCardInfo(method=self.name)
