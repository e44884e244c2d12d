"""The one training loop, over Accelerate. It knows nothing about modalities.

An objective (``multissl.objectives.base.Objective``) supplies the model, the collator and the
batch -> losses function; the trainer supplies everything else: devices and mixed precision,
accumulation, clipping, AdamW, schedules, evaluation, logging, and checkpoints that resume exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from multissl import config as config_lib
from multissl.data.loader import make_loader
from multissl.errors import ConfigError, TrainingError, TrainingInterrupted
from multissl.hub import HubConfig
from multissl.metrics import JsonlWriter, Mean, MetricSums, scalar
from multissl.objectives.base import Objective
from multissl.probe import ProbeConfig

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
MODEL_DIR = "model"  # the exported model; with a best metric, the best evaluated one so far
PREDICTIONS_FILE = "predictions.jsonl"  # the exported model's predictions on the eval split
LOWER_IS_BETTER = ("loss", "wer", "cer", "perplexity", "error", "error_rate")


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is better (losses, error rates), by its name."""
    return any(metric == m or metric.endswith(f"_{m}") for m in LOWER_IS_BETTER)
SKIP_PREFIX = "skipped_"  # count units that are running totals of dropped bad inputs, not throughput


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
    lr: float = 5e-4
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    """Used when warmup_steps is 0: a fraction of max_steps."""
    min_lr_ratio: float = 0.0
    """The schedule decays to lr x min_lr_ratio."""
    weight_decay: float = 0.01
    """Applied to matrices only: never to biases or norm weights."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
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
    pin_memory: bool = True
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
    """The eval metric that picks which evaluated model is exported (lower is better for losses, error
    rates, wer, cer and perplexity, higher for the rest); empty = the objective's choice (fine-tuning
    tasks keep their best model by their headline metric; pretraining exports the last)."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """A frozen-feature probe run at every evaluation (``trainer.probe.task=text-topics``, keywords,
    shapes, or files), logged as ``probe/linear_acc``, ``probe/knn_acc`` and ``probe/chance``."""
    hub: HubConfig = field(default_factory=HubConfig)
    """Push the final model to the Hugging Face Hub (``trainer.hub.push=true trainer.hub.repo_id=NAME``)."""

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
        unknown = set(self.trackers) - {"tensorboard", "wandb"}
        if unknown:
            raise ConfigError(f"trainer.trackers: unknown tracker(s) {sorted(unknown)}; known: tensorboard, wandb")


@dataclass
class TrainerState:
    """Where training stands; saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    seen: dict[str, float] = field(default_factory=dict)
    """Every unit an objective counts (samples, tokens, audio_seconds, ...), over all processes."""
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    train_seconds: float = 0.0
    log_window: dict[str, list[float]] = field(default_factory=dict)
    """Metric sums since the last log line (over processes), so logs after a resume match."""
    rank_positions: list[list[int]] = field(default_factory=list)
    """(epoch, batch_in_epoch) of every process: streamed shards can be consumed unevenly."""
    best: dict[str, Any] = field(default_factory=dict)
    """The best evaluation so far by ``best_metric``: ``{"step", "metric", "value", "metrics"}``."""


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


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices only (not biases, norms or other vectors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(kind: str, warmup: int, total: int, min_ratio: float):
    """Linear warm-up, then cosine/linear decay to ``min_ratio`` (or constant)."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return min_ratio + (1 - min_ratio) * (1 - progress)

    return f


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one has no trainer_state.json)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


class Trainer:
    """``Trainer(cfg).fit(objective, train_data, eval_data)``.

    Construct it before building the model: it seeds every RNG and sets up the devices.
    """

    def __init__(self, cfg: TrainerConfig, run_config: Any = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.cfg = cfg
        self.run_config = run_config
        self.output_dir = Path(cfg.output_dir)
        trackers = self._trackers()
        # Accelerate keeps one state per process; a second run in the same process (the demo, a
        # notebook) may ask for other settings. The process group (PartialState) is kept.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.grad_accum_steps,
            cpu=cfg.cpu,
            log_with=trackers or None,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "tensorboard")
            ),
        )
        if cfg.tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        set_seed(cfg.seed)
        self._stop_signal: int | None = None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if run_config is not None:
                self._write_config(run_config)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ helpers
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def main_process_first(self) -> contextlib.AbstractContextManager:
        """Run data preparation on the main process first, so the others reuse its cache."""
        return self.accelerator.main_process_first()

    def print(self, *args: Any) -> None:
        self.accelerator.print(*args, flush=True)

    def _trackers(self) -> list[str]:
        trackers = list(self.cfg.trackers)
        if "wandb" in trackers:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ConfigError("trainer.trackers includes 'wandb' but wandb is not installed (pip install wandb)") from None
        return trackers

    def _write_config(self, run_config: Any) -> None:
        path = self.output_dir / "config.yaml"
        new = config_lib.to_dict(run_config)
        if path.exists():
            import yaml

            old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            flat_old, flat_new = _flatten(old), _flatten(new)
            changed = sorted(k for k, v in flat_new.items() if flat_old.get(k) != v)
            if changed:
                print(f"note: config differs from the one saved in {path}: {', '.join(changed)}", flush=True)
        config_lib.save(run_config, path)

    # ---------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, state: TrainerState, window: MetricSums | None = None) -> Path:
        acc = self.accelerator
        state.log_window = window.global_sums(acc) if window is not None else {}
        from accelerate.utils import gather_object

        positions = [[state.epoch, state.batch_in_epoch]]
        state.rank_positions = gather_object(positions) if acc.num_processes > 1 else positions
        root = self.output_dir / CHECKPOINTS
        final = root / f"step_{state.step:08d}"
        tmp = root / f".partial-step_{state.step:08d}"
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if self.is_main:
            (tmp / STATE_FILE).write_text(json.dumps(state.__dict__, indent=1), encoding="utf-8")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # atomic: a crash before this leaves only a .partial folder
            for old in list_checkpoints(self.output_dir)[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _load_checkpoint(self, path: Path) -> TrainerState:
        self.accelerator.load_state(str(path))
        raw = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        state = TrainerState(**raw)
        rank = self.accelerator.process_index
        if len(state.rank_positions) == self.accelerator.num_processes:  # same process count: own position
            state.epoch, state.batch_in_epoch = state.rank_positions[rank]
        return state

    # -------------------------------------------------------------------- signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # second signal: give up immediately
            raise KeyboardInterrupt
        self._stop_signal = signum

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal is not None else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    # ----------------------------------------------------------------------- fit
    def total_steps(self, train_data: Any, batches_per_epoch: int | None = None) -> int:
        """Optimizer steps: max_steps, or epochs x batches (this process's batches of the epoch)."""
        if not hasattr(train_data, "__len__"):
            if self.cfg.max_steps > 0:
                return self.cfg.max_steps
            raise ConfigError("streaming data has no length: set trainer.max_steps")
        per_epoch = batches_per_epoch if batches_per_epoch is not None else \
            len(train_data) // (self.cfg.batch_size * self.accelerator.num_processes)
        if per_epoch == 0:
            raise ConfigError(
                f"the training set ({len(train_data)} samples) is smaller than one batch "
                f"({self.cfg.batch_size} x {self.accelerator.num_processes} processes); lower trainer.batch_size"
            )
        if self.cfg.max_steps > 0:
            return self.cfg.max_steps
        return max(1, int(self.cfg.epochs * per_epoch) // self.cfg.grad_accum_steps)

    def _loader(self, objective: Objective, data: Any, train: bool):
        acc = self.accelerator
        return make_loader(
            data,
            self.cfg.batch_size if train else (self.cfg.eval_batch_size or self.cfg.batch_size),
            objective.collate if train else objective.collate_eval,
            seed=self.cfg.seed,
            shuffle=train,
            drop_last=train,
            rank=acc.process_index,
            world_size=acc.num_processes,
            split_tag=0 if train else 1,
            num_workers=self.cfg.num_workers,
            pin_memory=self.cfg.pin_memory and acc.device.type == "cuda",
        )

    def _micro_batches(self, loader: Any, positioner: Any, state: TrainerState) -> Iterator[Any]:
        """Endless stream of training batches; ``state`` tracks the position for resume."""
        while True:
            positioner.set_epoch(state.epoch, state.batch_in_epoch)
            produced = False
            for batch in loader:
                produced = True
                state.batch_in_epoch += 1
                yield batch
            if not produced and state.batch_in_epoch == 0:
                raise TrainingError("the training data produced no batches")
            state.epoch += 1
            state.batch_in_epoch = 0

    def fit(self, objective: Objective, train_data: Any, eval_data: Any = None) -> FitResult:
        cfg, acc = self.cfg, self.accelerator
        train_loader, train_pos = self._loader(objective, train_data, train=True)
        eval_loader = self._loader(objective, eval_data, train=False)[0] if eval_data is not None else None
        total = self.total_steps(train_data, _len_or_none(train_loader))
        warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total)

        model = objective.model
        best_name = cfg.best_metric or getattr(objective, "best_metric", "")
        if best_name and eval_loader is None:
            best_name = ""  # nothing to compare: the last model is exported
        if cfg.gradient_checkpointing:
            inner = objective.export(model)
            # transformers 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable
            enable = getattr(inner, "activation_checkpointing_enable", None) or getattr(inner, "gradient_checkpointing_enable", None)
            if enable is None:
                raise ConfigError(f"{type(inner).__name__} does not support gradient checkpointing")
            enable()
        optimizer = torch.optim.AdamW(
            decay_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            betas=cfg.adam_betas,
            eps=cfg.adam_eps,
            fused=acc.device.type == "cuda",
        )
        # The scheduler is stepped by us once per optimizer step (Accelerate's wrapper would step it
        # once per process); it is registered so save_state/load_state keep it.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_schedule, warmup, total, cfg.min_lr_ratio))
        model, optimizer = acc.prepare(model, optimizer)
        if cfg.compile:
            model = torch.compile(model)
        acc.register_for_checkpointing(scheduler)
        acc.register_for_checkpointing(objective)

        metrics_log = JsonlWriter(self.output_dir / "metrics.jsonl")
        state = TrainerState()
        checkpoints = list_checkpoints(self.output_dir)
        if checkpoints and not cfg.resume:
            raise ConfigError(
                f"{self.output_dir} holds checkpoints of an earlier run ({checkpoints[-1].name}); "
                "use another trainer.output_dir, or trainer.resume=true to continue it"
            )
        if checkpoints:
            state = self._load_checkpoint(checkpoints[-1])
            self.print(f"resuming from {checkpoints[-1]} (step {state.step}/{total})")
            if self.is_main:
                metrics_log.truncate_after(state.step)
        elif self.is_main and metrics_log.path.exists():
            metrics_log.path.unlink()
        acc.wait_for_everyone()
        if acc.trackers == [] and cfg.trackers:
            acc.init_trackers("multissl", config=_flat_hparams(self.run_config))

        history: list[dict[str, Any]] = []

        def log(record: dict[str, Any]) -> None:
            record = {"step": state.step, **record}
            history.append(record)
            if self.is_main:
                metrics_log.write(record)
                numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
                if numeric and acc.trackers:
                    acc.log(numeric, step=state.step)

        from tqdm.auto import tqdm

        bar = tqdm(
            total=total, initial=state.step, unit="step", dynamic_ncols=True,
            disable=not (self.is_main and cfg.progress_bar), desc=objective.name,
        )
        first_loss: float | None = None
        final_metrics: dict[str, float] = {}
        batches = self._micro_batches(train_loader, train_pos, state)
        window = MetricSums()
        if self.is_main:  # the saved sums are already totals over processes
            window.load_state_dict(state.log_window)
        window_start = time.perf_counter()
        units = sorted({"samples", "tokens", *state.seen})
        unsynced = dict.fromkeys(units, 0.0)  # this process's counts since the last sync

        def sync_counts() -> None:
            totals = torch.tensor([unsynced[u] for u in units], dtype=torch.float64, device=acc.device)
            if acc.num_processes > 1:
                totals = acc.reduce(totals, reduction="sum")
            for u, v in zip(units, totals.tolist()):
                state.seen[u] = state.seen.get(u, 0.0) + v
                unsynced[u] = 0.0
            state.samples_seen, state.tokens_seen = int(state.seen["samples"]), int(state.seen["tokens"])

        seen_at_window_start = dict(state.seen)
        model.train()

        with self._signals():
            if state.step == 0 and eval_loader is not None and cfg.eval_every > 0:
                log(self._evaluate(objective, model, eval_loader, tag="eval")[0])
            while state.step < total:
                step_start = time.perf_counter()
                nonfinite_loss = torch.zeros((), device=acc.device)
                for _ in range(cfg.grad_accum_steps):
                    batch = next(batches)
                    counts = objective.count(batch)
                    for u, v in counts.items():
                        if u not in unsynced:  # a unit first seen now: all processes see it in batch 1
                            units.append(u)
                            unsynced[u] = 0.0
                        unsynced[u] += v
                    batch = _to_device(batch, acc.device)
                    with acc.accumulate(model), acc.autocast():
                        out = objective.compute(model, batch)
                        loss = self._backward_loss(out["loss"])
                        nonfinite_loss += (~torch.isfinite(loss.detach())).float()
                        acc.backward(loss)
                    window.add(out)
                grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
                grad_norm_f = float(grad_norm) if grad_norm is not None else float("nan")
                if acc.num_processes > 1:
                    nonfinite_loss = acc.reduce(nonfinite_loss, reduction="sum")
                bad = bool(nonfinite_loss.item() > 0) or (cfg.mixed_precision != "fp16" and not math.isfinite(grad_norm_f))
                if bad:
                    state.nonfinite_in_a_row += 1
                    state.nonfinite_total += 1
                    if acc.scaler is not None:  # fp16: grads were unscaled; lower the scale and re-arm
                        acc.scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    self.print(f"warning: non-finite loss/gradients at step {state.step + 1}; step skipped "
                               f"({state.nonfinite_in_a_row} in a row)")
                    if state.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                        raise TrainingError(
                            f"loss was non-finite for {state.nonfinite_in_a_row} steps in a row (step {state.step + 1}); "
                            "try a lower trainer.lr, trainer.max_grad_norm=1.0 or mixed_precision=bf16 instead of fp16"
                        )
                else:
                    state.nonfinite_in_a_row = 0
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.train_seconds += time.perf_counter() - step_start
                extra = objective.on_step_end(state.step)
                bar.update(1)

                if state.step % cfg.log_every == 0 or state.step == total:
                    means = window.reduce(acc)
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    sync_counts()
                    done = {u: v - seen_at_window_start.get(u, 0.0) for u, v in state.seen.items()}
                    seen_at_window_start = dict(state.seen)
                    record = {f"train/{k}": v for k, v in means.items() if not k.startswith("_")}  # _name: pooled for eval only
                    if first_loss is None and "train/loss" in record:
                        first_loss = record["train/loss"]
                    record.update({
                        "train/lr": scheduler.get_last_lr()[0],
                        "train/grad_norm": grad_norm_f,
                        "train/epoch": state.epoch + state.batch_in_epoch / max(1, _len_or_zero(train_loader)),
                        **{f"throughput/{u}_per_s": v / elapsed for u, v in done.items()
                           if not u.startswith(SKIP_PREFIX) and (v > 0 or u == "samples")},
                        **{f"data/{u}": v for u, v in state.seen.items() if u.startswith(SKIP_PREFIX) and v > 0},
                        **{f"train/{k}": v for k, v in extra.items()},
                    })
                    if state.nonfinite_total:
                        record["train/nonfinite_steps"] = state.nonfinite_total
                    warning = objective.on_log(means, state.step, warmup)
                    if warning:
                        self.print(f"warning: {warning}")
                        record["train/warning"] = warning
                    log(record)
                    bar.set_postfix(loss=f"{record.get('train/loss', float('nan')):.4f}",
                                    sps=f"{record['throughput/samples_per_s']:.1f}")
                    window_start = time.perf_counter()

                is_last = state.step == total
                if eval_loader is not None and ((cfg.eval_every and state.step % cfg.eval_every == 0) or is_last):
                    final_metrics, predictions = self._evaluate(objective, model, eval_loader, tag="eval")
                    log(final_metrics)
                    self._keep_if_best(objective, model, state, final_metrics, predictions, best_name, is_last)
                    window_start = time.perf_counter()
                if (cfg.save_every and state.step % cfg.save_every == 0) or is_last:
                    sync_counts()
                    self._save_checkpoint(state, window)
                if not is_last and self._should_stop():
                    sync_counts()
                    path = self._save_checkpoint(state, window)
                    bar.close()
                    acc.end_training()
                    raise TrainingInterrupted(
                        f"interrupted at step {state.step}/{total}; checkpoint saved to {path}. "
                        "Run the same command again to resume."
                    )
        bar.close()
        for unit, total in state.seen.items():
            if unit.startswith(SKIP_PREFIX) and total > 0:
                self.print(f"warning: {unit.removeprefix(SKIP_PREFIX).replace('_', ' ')}: {int(total)} skipped during "
                           "training (all workers and processes; the first few are named above)")
        if not final_metrics and eval_loader is not None:  # resumed a run that had already finished
            final_metrics, predictions = self._evaluate(objective, model, eval_loader, tag="eval")
            self._keep_if_best(objective, model, state, final_metrics, predictions, best_name, True)
        best_step = None
        if best_name and state.best:
            best_step = state.best["step"]
            if best_step != state.step and not (self.output_dir / MODEL_DIR).is_dir():
                self.print(f"warning: the best model (step {best_step}) is no longer in {self.output_dir / MODEL_DIR}; "
                           "exporting the last one instead")
                best_step = None
                state.best = {}
            else:
                final_metrics = state.best["metrics"]
        self._export(objective, model, state, final_metrics, history, best_step)
        acc.end_training()
        return FitResult(state, first_loss, {k.split("/", 1)[1]: v for k, v in final_metrics.items() if "/" in k}, history,
                         self._exported(objective, model), best_step, best_name,
                         len(train_data) if hasattr(train_data, "__len__") else None)

    def _backward_loss(self, loss: Any) -> torch.Tensor:
        """The loss to differentiate. A ``Mean`` is normalised by its count over all processes
        (masked tokens/frames), so every item weighs the same whatever the split; DDP then
        averages over processes, hence the factor num_processes."""
        acc = self.accelerator
        if not isinstance(loss, Mean) or acc.num_processes == 1:
            return scalar(loss)
        count = torch.as_tensor(loss.count, dtype=torch.float32, device=acc.device).detach().reshape(1)
        total_count = acc.reduce(count.clone(), reduction="sum")
        return loss.total * acc.num_processes / total_count.clamp_min(1e-12)[0]

    # ------------------------------------------------------------------ evaluate
    @torch.no_grad()
    def _evaluate(self, objective: Objective, model: nn.Module, loader: Any, tag: str
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Eval metrics (over all processes) and, when the objective makes them, its predictions
        (``compute`` may return a ``predictions`` list in eval mode), gathered on the main process."""
        acc = self.accelerator
        model.eval()
        # Evaluate the unwrapped module: processes may get unequal numbers of eval batches, and a
        # DDP forward could otherwise start collectives that the other processes never join.
        inner = acc.unwrap_model(model)
        sums = MetricSums()
        predictions: list[dict[str, Any]] = []
        for i, batch in enumerate(loader):
            if self.cfg.eval_max_batches and i >= self.cfg.eval_max_batches:
                break
            with acc.autocast():
                out = objective.compute(inner, _to_device(batch, acc.device))
            predictions.extend(out.pop("predictions", None) or [])
            sums.add(out)
        means = objective.summarize(sums.reduce(acc))
        record: dict[str, Any] = {f"{tag}/{k}": v for k, v in means.items()}
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            predictions = gather_object(predictions)
        if self.is_main:
            extras = objective.on_evaluate(self._exported(objective, model))
            record.update({f"{tag}/{k}": v for k, v in extras.items()})
            inputs = objective.probe_inputs() if self.cfg.probe.task else None
            if inputs is not None:
                from multissl.probe import probe_module

                probed = probe_module(self._exported(objective, model), cfg=self.cfg.probe, device=acc.device, **inputs)
                record.update({f"probe/{k}": v for k, v in probed.items()})
        if acc.num_processes > 1:  # every process decides about the best model from the same record
            from accelerate.utils import broadcast_object_list

            record = broadcast_object_list([record])[0]
        model.train()
        return record, predictions

    def _keep_if_best(self, objective: Objective, model: nn.Module, state: TrainerState, record: dict[str, Any],
                      predictions: list[dict[str, Any]], best_name: str, is_last: bool) -> None:
        """Remember this evaluation when it is the best so far by ``best_name``: its metrics in the
        state (so a resume knows), its model in output_dir/model (unless it is the last, which is
        exported anyway), its predictions in output_dir/predictions.jsonl. Without a best metric, the
        predictions of the last evaluation are written."""
        acc = self.accelerator
        if not best_name:
            if self.is_main and predictions and is_last:
                _write_jsonl(self.output_dir / PREDICTIONS_FILE, predictions)
            return
        value = record.get(f"eval/{best_name}")
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            known = sorted(k.split("/", 1)[1] for k, v in record.items() if isinstance(v, (int, float)))
            raise ConfigError(f"trainer.best_metric={best_name!r} is not an eval metric of {objective.name} "
                              f"(or is not finite); eval metrics: {', '.join(known)}")
        lower = lower_is_better(best_name)
        best = state.best.get("value")
        if best is not None and not (value < best if lower else value > best):
            return
        state.best = {"step": state.step, "metric": best_name, "value": value,
                      "metrics": {k: v for k, v in record.items() if isinstance(v, (int, float, str))}}
        if self.is_main:
            if predictions:
                _write_jsonl(self.output_dir / PREDICTIONS_FILE, predictions)
            if not is_last:  # written whole, then swapped in: model/ is never half a model
                tmp = self.output_dir / f".{MODEL_DIR}.partial"
                shutil.rmtree(tmp, ignore_errors=True)
                objective.save_pretrained(self._exported(objective, model), tmp)
                shutil.rmtree(self.output_dir / MODEL_DIR, ignore_errors=True)
                os.replace(tmp, self.output_dir / MODEL_DIR)
        acc.wait_for_everyone()

    def _exported(self, objective: Objective, model: nn.Module) -> nn.Module:
        unwrapped = self.accelerator.unwrap_model(model)
        return objective.export(getattr(unwrapped, "_orig_mod", unwrapped))

    def _export(self, objective: Objective, model: nn.Module, state: TrainerState, final_metrics: dict[str, Any],
                history: list[dict[str, Any]], kept_step: int | None = None) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.is_main:
            out = self.output_dir / MODEL_DIR
            if kept_step is not None and kept_step != state.step:  # model/ was written when it was the best
                self.print(f"exported the model of step {kept_step}, the best by eval/{state.best['metric']} "
                           f"({state.best['value']:.4g})")
            else:
                objective.save_pretrained(self._exported(objective, model), out)
            from multissl.hub import write_model_card

            write_model_card(out, objective, state, final_metrics, self.run_config, self.output_dir / "metrics.jsonl")
        acc.wait_for_everyone()
        if self.is_main and self.cfg.hub.push:  # after the barrier: the other processes need not wait for it
            self._push()

    def _push(self) -> None:
        """Upload the exported model. A failure is a one-line warning, never a failed run: the model is
        saved, and ``multissl push`` can upload it later."""
        from multissl.hub import push_failure_warning, push_to_hub

        hub = self.cfg.hub
        try:
            result = push_to_hub(self.output_dir, hub.repo_id, private=hub.private, revision=hub.revision,
                                 commit_message=hub.commit_message, exist_ok=True)
        except Exception as err:  # whatever went wrong, the trained model must not be lost to it
            self.print(push_failure_warning(err, hub, self.output_dir))
            return
        what = f"commit {result.commit[:10]}" if result.changed else "unchanged, no new commit"
        self.print(f"pushed {self.output_dir / 'model'} to {result.url} (branch {result.revision}, {what})")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Written whole, then renamed into place: a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _len_or_zero(loader: Any) -> int:
    return _len_or_none(loader) or 0


def _len_or_none(loader: Any) -> int | None:
    """Batches in a loader (duration batching decides its own count); None for streams."""
    try:
        return len(loader)
    except TypeError:
        return None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


def _flat_hparams(run_config: Any) -> dict[str, Any]:
    """Scalars only: TensorBoard's hparams plugin rejects lists and None."""
    if run_config is None:
        return {}
    flat = _flatten(config_lib.to_dict(run_config))
    return {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}
