"""The trainer's settings: optimisation, schedules, logging and checkpointing; shared by every recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from multissl.errors import ConfigError

OPTIMIZERS = ("adamw", "sgd", "lars")


@dataclass
class TrainerConfig:
    """Optimisation, logging and checkpointing; shared by every recipe."""

    output_dir: str = "outputs/run"
    seed: int = 0
    max_steps: int = 0
    """Optimizer steps to train for; 0 derives it from ``epochs`` (required for streaming data)."""
    epochs: float = 1.0
    batch_size: int = 16
    """Per process and micro-batch; the effective batch is batch_size x grad_accum_steps x processes."""
    eval_batch_size: int = 0
    """0 = same as batch_size."""
    grad_accum_steps: int = 1
    optimizer: Literal["adamw", "sgd", "lars"] = "adamw"
    """adamw (torch, fused on CPU and GPU), sgd (momentum, fused too), or lars (timm's: SGD with layer-wise trust ratios,
    not applied to biases and norms, as SimCLR and BYOL train)."""
    lr: float = 5e-4
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    """Used when warmup_steps is 0: a fraction of max_steps."""
    min_lr_ratio: float = 0.0
    """The schedule decays to lr x min_lr_ratio."""
    weight_decay: float = 0.01
    """Applied to matrices only: never to biases or norm weights."""
    weight_decay_end: float | None = None
    """Cosine schedule of the weight decay from weight_decay to this value (DINO: 0.04 -> 0.4); None = constant."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    momentum: float = 0.9
    """sgd and lars: momentum."""
    nesterov: bool = False
    lars_trust_coefficient: float = 0.001
    max_grad_norm: float = 1.0
    """Clip the global gradient norm; 0 disables clipping (the norm is still logged)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    cpu: bool = False
    """Force CPU even when a GPU is present."""
    tf32: bool = True
    compile: bool = False
    """torch.compile the model (GPU recommended)."""
    gradient_checkpointing: bool = False
    num_workers: int = 0
    worker_start_method: Literal["", "fork", "spawn", "forkserver"] = ""
    """How DataLoader workers start; empty = the platform's default (spawn on macOS)."""
    pin_memory: bool = True
    keep_host_memory: bool = True
    """Training on CPU under glibc: keep freed memory mapped between steps instead of handing it back
    to the kernel and faulting it in again (10-20% of a step on the tiny presets); the peak is the
    same. False leaves malloc as the process found it."""
    log_every: int = 10
    eval_every: int = 0
    """Evaluate every N steps; 0 = only at the end."""
    eval_max_batches: int = 0
    """Cap eval batches per process; 0 = the whole eval split."""
    save_every: int = 0
    """Checkpoint every N steps; 0 = only at the end (and on SIGINT/SIGTERM)."""
    keep_last: int = 2
    resume: bool = True
    """Resume from the newest checkpoint in output_dir when one exists."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Besides metrics.jsonl: any of tensorboard, wandb."""
    wandb_project: str = "multissl"
    max_nonfinite_steps: int = 5
    """Stop with an error after this many non-finite losses in a row (each one is skipped)."""
    progress_bar: bool = True
    best_metric: str = ""
    """The eval metric that picks which evaluated model is exported (lower is better for losses and
    error rates, as the objective says); empty = the objective's choice (fine-tuning tasks keep their
    best model by their headline metric; pretraining exports the last)."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum_steps", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "save_every", "warmup_steps", "eval_max_batches", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"trainer.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ConfigError("set trainer.max_steps or a positive trainer.epochs")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"trainer.momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.optimizer == "adamw":
            raise ConfigError("trainer.nesterov applies to optimizer=sgd or lars, not adamw")
        if self.weight_decay < 0 or (self.weight_decay_end is not None and self.weight_decay_end < 0):
            raise ConfigError("trainer.weight_decay and trainer.weight_decay_end must be >= 0")
        unknown = set(self.trackers) - {"tensorboard", "wandb"}
        if unknown:
            raise ConfigError(f"trainer.trackers: unknown tracker(s) {sorted(unknown)}; known: tensorboard, wandb")
