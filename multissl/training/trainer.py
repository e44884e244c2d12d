"""The one training loop, over Accelerate. It knows nothing about modalities.

An objective (``multissl.training.objective.Objective``) supplies the model, the collator, the
batch -> losses function, its units and its hooks; callbacks (probes, model card, Hub push) are
attached by the recipe; the trainer supplies everything else: devices and mixed precision,
accumulation, clipping, the optimizer and its schedules, evaluation, logging, and checkpoints that
resume exactly.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multissl import config as config_lib
from multissl.errors import ConfigError, OutputError, TrainingError, TrainingInterrupted, first_line
from multissl.full_disk import is_out_of_space, no_space_error
from multissl.metrics import JsonlWriter, Mean, MetricSums, scalar
from multissl.training import sharding, zero
from multissl.training.callbacks import Callback, Export
from multissl.training.config import TrainerConfig
from multissl.training.distributed import (
    AttributeForwardingDDP,
    broadcast_module,
    gather_with_grad,
    launched_on_cpu_only,
)
from multissl.training.durable import fsync_path, fsync_tree
from multissl.training.host_malloc import keep_freed_host_memory
from multissl.training.loader import make_loader
from multissl.training.objective import Objective, TrainContext
from multissl.training.optim import apply_schedules, build_optimizer, torch_groups
from multissl.training.skips import BadInputs, DistinctTally
from multissl.training.state import CHECKPOINTS, STATE_FILE, FitResult, TrainerState, list_checkpoints

MODEL_DIR = "model"  # the exported model; with a best metric, the best evaluated one so far
PREDICTIONS_FILE = "predictions.jsonl"  # the exported model's predictions on the eval split
SKIP_PREFIX = "skipped_"  # count units that are running totals of dropped bad inputs, not throughput

__all__ = ["FitResult", "MODEL_DIR", "Trainer", "TrainerConfig", "TrainerState", "list_checkpoints"]


class _Checkpointed:
    """The objective's own state and its auxiliary modules, as one object Accelerate checkpoints."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective

    def state_dict(self) -> dict[str, Any]:
        modules = {name: m.state_dict() for name, m in self.objective.auxiliary_modules().items()}
        return {"objective": self.objective.state_dict(), "modules": modules}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.objective.load_state_dict(state.get("objective", {}))
        for name, module in self.objective.auxiliary_modules().items():
            if name not in state.get("modules", {}):
                raise TrainingError(f"the checkpoint has no state for the objective's module {name!r}")
            module.load_state_dict(state["modules"][name])


def other_world_size_warning(checkpoint: Path, saved: int, now: int) -> str:
    """What a resume on another number of processes changes: it goes on (the weights, optimizer and
    schedules load), but ``trainer.batch_size`` is per process and each process kept its own place in
    its own shard of the data, so from here the run is not the one that was interrupted."""
    return (f"warning: {checkpoint} was saved by {saved} processes and this run has {now}: training goes on from "
            f"its step, but each step now takes {now}/{saved} of the samples it did (trainer.batch_size is per "
            f"process) and the batches differ from an unbroken run's; resume on {saved} processes for an exact one")


class Trainer:
    """``Trainer(cfg, run_config, callbacks).fit(objective, train_data, eval_data)``.

    Construct it before building the model: it seeds every RNG and sets up the devices.
    """

    def __init__(self, cfg: TrainerConfig, run_config: Any = None, callbacks: Sequence[Callback] = ()) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.cfg = cfg
        self.run_config = run_config
        self.callbacks = list(callbacks)
        self.output_dir = Path(cfg.output_dir)
        trackers = self._trackers()
        # Accelerate keeps one state per process; a second run in the same process (the demo, a
        # notebook) may ask for other settings. The process group (PartialState) is kept.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
        fsdp_plugin = sharding.cpu_fsdp_plugin(cfg.cpu)
        with sharding.parallelism_held_back(fsdp_plugin) as parallelism, zero.process_group(cfg.cpu) as ds_args:
            self.accelerator = Accelerator(
                fsdp_plugin=fsdp_plugin,
                mixed_precision=cfg.mixed_precision,
                gradient_accumulation_steps=cfg.grad_accum_steps,
                # on CPU processes (FSDP's too): gloo, as under torchrun with ACCELERATE_USE_CPU
                **{"cpu": cfg.cpu or fsdp_plugin is not None or launched_on_cpu_only(), **ds_args},
                log_with=trackers or None,
                project_config=ProjectConfiguration(
                    project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "tensorboard")
                ),
            )
        sharding.fsdp_on_cpu(self.accelerator, fsdp_plugin, parallelism)
        self.sharded = sharding.is_sharded(self.accelerator)
        self.deepspeed = zero.is_deepspeed(self.accelerator)
        if self.deepspeed:
            zero.honour_init_flag(self.accelerator)
        self._input_dtype = zero.input_dtype(self.accelerator) if self.deepspeed else None
        sharding.refuse_unsupported(str(self.accelerator.distributed_type),
                                    getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", None) if self.sharded else None)
        self._replica: sharding.FullReplica | None = None  # under FSDP and DeepSpeed: what the export is rebuilt into
        self._whole: tuple[int, nn.Module | None] | None = None  # (updates, whole copy) under FSDP
        self._updates = 0  # optimizer updates this process has made (the whole copy's key)
        if cfg.tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        set_seed(cfg.seed)
        self._stop_signal: int | None = None
        self.data_wait_seconds = 0.0  # all time spent waiting for training batches; see _LogWindow.perf
        # One run per output folder (multissl.run_lock): rank 0 checks and locks it before anything is
        # written, until the end of fit; every process learns the outcome, so none waits for a rank
        # that gave up.
        from multissl.errors import OutputError
        from multissl.run_lock import RunLock, claim

        self._run_lock: RunLock | None = None
        problem = ""
        if self.is_main:
            try:
                self._run_lock = claim(self.output_dir)
            except OutputError as err:
                problem = str(err)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            problem = broadcast_object_list([problem])[0]
        if problem:
            raise OutputError(problem)
        if self.is_main and run_config is not None:
            self._write_config(run_config)
        self.accelerator.wait_for_everyone()

    def _finish_trackers(self) -> None:
        """Close the trackers and leave the process group up. ``Accelerator.end_training`` would also
        destroy the group, and with torch 2.11's gloo that now and then aborts a process that has saved
        everything (exit -6, "terminate called without an active exception"); the group is left to
        whoever opened it: a recipe leaves through ``multissl.cli.leave_process_group``, which exits
        without running the C++ destructors, and callers of ``fit`` can still run collectives after it."""
        for tracker in self.accelerator.trackers:
            tracker.finish()

    def release_output_dir(self) -> None:
        """Unlock the output folder (at the end of fit): another run may use it now. A trainer that
        never finishes holds it until it is garbage-collected, or until the next trainer of this
        process on the same folder takes it over."""
        if self._run_lock is not None:
            self._run_lock.release()
            self._run_lock = None

    # ------------------------------------------------------------------ helpers
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

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
        """Written into ``.partial-step_N``, renamed to ``step_N`` once whole: a kill or a full disk
        mid-write leaves the complete checkpoints as they were (see `_write_together`)."""
        acc = self.accelerator
        state.log_window = window.global_sums(acc) if window is not None else {}
        from accelerate.utils import gather_object

        positions = [[state.epoch, state.batch_in_epoch]]
        state.rank_positions = gather_object(positions) if acc.num_processes > 1 else positions
        root = self.output_dir / CHECKPOINTS
        final = root / f"step_{state.step:08d}"
        tmp = root / f".partial-step_{state.step:08d}"

        def start() -> None:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".partial-step_*"):  # this one, or left by a killed run: room for this one
                shutil.rmtree(stale, ignore_errors=True)

        def finish() -> None:
            _write_state(tmp / STATE_FILE, state)  # last: a folder without it is never taken for a checkpoint
            fsync_tree(tmp)  # on the disk before the rename: a power cut cannot leave it empty
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # atomic: a crash before this leaves only a .partial folder
            fsync_path(root)  # the rename itself
            for old in list_checkpoints(self.output_dir)[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

        # each step is also the barrier between the processes (the RNG states are written by each)
        self._write_together(start if self.is_main else None, [tmp])
        self._write_together(lambda: acc.save_state(str(tmp)), [tmp])
        self._write_together(finish if self.is_main else None, [tmp])
        return final

    def _write_together(self, write: Callable[[], None] | None, writing: Sequence[Path],
                        partial: Sequence[Path] | None = None) -> None:
        """Run this process's part of a write (None: nothing to write here), then learn whether every
        process's part succeeded. It is a collective, so it is also the barrier: on a failure every
        process raises, none is left waiting for one that gave up. ``writing``: the folders or files
        being written; ``partial``: what a failure leaves half-written (default ``writing``), removed
        by the main process once all have stopped. A full disk (or quota) becomes a one-line
        OutputError naming the file and the newest complete checkpoint, which older ones never
        depend on: checkpoints are renamed into place whole, and old ones removed only after."""
        acc = self.accelerator
        failure: Exception | None = None
        if write is not None:
            try:
                write()
            except Exception as err:  # re-raised below, once the other processes know
                failure = self._no_space(err, writing) or err
        report = None if failure is None else (acc.process_index, type(failure).__name__, str(failure))
        reports = [report] if report is not None else []
        if acc.num_processes > 1:
            flag = torch.tensor([0.0 if failure is None else 1.0], device=acc.device)
            if acc.reduce(flag, reduction="sum").item() > 0:
                from accelerate.utils import gather_object

                reports = [r for r in gather_object([report]) if r is not None]
        if not reports:
            return
        if self.is_main:
            for path in writing if partial is None else partial:
                _remove(path)
        if failure is not None:
            raise failure
        rank, kind, message = reports[0]
        if kind == OutputError.__name__:  # the same line on every process
            raise OutputError(message)
        raise TrainingError(f"process {rank} failed while writing {writing[0]}: {kind}: {first_line(message)}")

    def _no_space(self, err: Exception, writing: Sequence[Path]) -> OutputError | None:
        """``err`` as the one-line full-disk error, or None when it is something else."""
        if isinstance(err, OutputError):
            return err
        if not is_out_of_space(err, writing[0].parent):
            return None
        checkpoints = list_checkpoints(self.output_dir)
        where = _file_being_written(err, writing, self.accelerator.process_index, self.is_main)
        return no_space_error(where, checkpoints[-1] if checkpoints else None)

    def _load_checkpoint(self, path: Path) -> TrainerState:
        state = TrainerState.from_dict(json.loads((path / STATE_FILE).read_text(encoding="utf-8")))
        if self.deepspeed:
            zero.refuse_other_world_size(path, len(state.rank_positions), self.accelerator.num_processes)
        self.accelerator.load_state(str(path))
        rank = self.accelerator.process_index
        saved, now = len(state.rank_positions), self.accelerator.num_processes
        if saved == now:  # same process count: own position
            state.epoch, state.batch_in_epoch = state.rank_positions[rank]
        elif saved:
            self.print(other_world_size_warning(path, saved, now))
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

    # ---------------------------------------------------------------------- setup
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
            objective.collator() if train else objective.eval_collator(),
            seed=self.cfg.seed,
            shuffle=train,
            drop_last=train,
            rank=acc.process_index,
            world_size=acc.num_processes,
            split_tag=0 if train else 1,
            num_workers=self.cfg.num_workers,
            pin_memory=self.cfg.pin_memory and acc.device.type == "cuda",
            multiprocessing_context=self.cfg.worker_start_method or None,
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

    def _enable_gradient_checkpointing(self, objective: Objective) -> None:
        inner = objective.export(objective.model)
        # transformers 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable
        enable = getattr(inner, "activation_checkpointing_enable", None) or getattr(inner, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ConfigError(f"{type(inner).__name__} does not support gradient checkpointing")
        enable()

    def _prepare_auxiliary(self, objective: Objective) -> None:
        """Auxiliary modules: on the device, untrained, rank 0's values everywhere, never in the model."""
        trained = {id(p) for p in objective.model.parameters()}
        for name, module in objective.auxiliary_modules().items():
            if any(id(p) in trained for p in module.parameters()):
                raise ConfigError(f"{objective.name}: auxiliary module {name!r} shares parameters with the trained "
                                  "model; keep teachers and queues outside objective.model")
            module.to(self.device)
            module.requires_grad_(False)
            broadcast_module(module)

    def _prepare(self, objective: Objective, total: int, warmup: int, steps_per_epoch: int | None):
        """The model wrapped for the devices, its optimizer, and the objective told the run's shape."""
        cfg, acc = self.cfg, self.accelerator
        if cfg.gradient_checkpointing:
            self._enable_gradient_checkpointing(objective)
        if self.sharded:
            sharding.refuse_unshardable(objective.name, objective.unshardable)
            sharding.without_input_embeddings_question(objective.model)
            if self.is_main:  # what the export and the probes are rebuilt into from the shards
                self._replica = sharding.FullReplica(objective.model)
            sharding.scalars_as_vectors(objective.model)  # after the replica: the export keeps their shape
        if self.deepspeed:
            zero.refuse_step_edits(objective)
            if self.is_main:  # the export is rebuilt from the engine's fp32 master weights
                self._replica = sharding.FullReplica(objective.model)
            zero.fill_config(acc, cfg.batch_size, cfg.grad_accum_steps, cfg.max_grad_norm, cfg.mixed_precision)
        groups = torch_groups(objective.param_groups(objective.model), objective.model)
        optimizer = build_optimizer(cfg, groups, acc.device)
        model, optimizer = acc.prepare(objective.model, optimizer)
        if self.sharded:  # so that a sharded checkpoint holds every parameter's state
            sharding.every_parameter_has_a_state(optimizer)
            self.print(sharding.layout(model))
        if self.deepspeed:
            zero.follow_train_mode(model)
            self.print(zero.layout(acc))
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model.__class__ = AttributeForwardingDDP
            model.broadcast_buffers = objective.broadcast_buffers
        if cfg.compile and self.deepspeed:  # the engine compiles the model it wraps, in place
            model.compile()
        elif cfg.compile:
            model = torch.compile(model)
        self._prepare_auxiliary(objective)
        acc.register_for_checkpointing(_Checkpointed(objective))
        objective.setup(TrainContext(total_steps=total, steps_per_epoch=steps_per_epoch, warmup_steps=warmup,
                                     world_size=acc.num_processes, rank=acc.process_index, device=acc.device,
                                     gather=gather_with_grad))
        return model, optimizer

    def _resume(self, metrics_log: JsonlWriter, total: int) -> TrainerState:
        checkpoints = list_checkpoints(self.output_dir)
        if checkpoints and not self.cfg.resume:
            raise ConfigError(
                f"{self.output_dir} holds checkpoints of an earlier run ({checkpoints[-1].name}); "
                "use another trainer.output_dir, or trainer.resume=true to continue it"
            )
        state = TrainerState()
        if checkpoints:
            state = self._load_checkpoint(checkpoints[-1])
            self.print(f"resuming from {checkpoints[-1]} (step {state.step}/{total})")
            if self.is_main:
                metrics_log.truncate_after(state.step)
        elif self.is_main and metrics_log.path.exists():
            metrics_log.path.unlink()
        self.accelerator.wait_for_everyone()
        return state

    # ----------------------------------------------------------------------- fit
    def fit(self, objective: Objective, train_data: Any, eval_data: Any = None) -> FitResult:
        cfg, acc = self.cfg, self.accelerator
        # seconds from process start to here (imports, config, data preparation, tokenizer training) and to
        # the end of the first optimizer step (model, data loaders, the step-0 evaluation, first batch)
        startup: dict[str, float] | None = {"perf/before_fit_seconds": process_age_seconds()}
        if cfg.keep_host_memory and acc.device.type == "cpu":
            keep_freed_host_memory()
        train_loader, train_pos = self._loader(objective, train_data, train=True)
        eval_loader = self._loader(objective, eval_data, train=False)[0] if eval_data is not None else None
        batches_per_epoch = _len_or_none(train_loader)
        total = self.total_steps(train_data, batches_per_epoch)
        warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total)
        best_name = (cfg.best_metric or objective.best_metric) if eval_loader is not None else ""
        model, optimizer = self._prepare(objective, total, warmup,
                                         batches_per_epoch // cfg.grad_accum_steps if batches_per_epoch else None)

        metrics_log = JsonlWriter(self.output_dir / "metrics.jsonl")
        state = self._resume(metrics_log, total)
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
        final_metrics: dict[str, Any] = {}
        batches = self._micro_batches(train_loader, train_pos, state)
        window = MetricSums()
        if self.is_main:  # the saved sums are already totals over processes
            window.load_state_dict(state.log_window)
        counter = _UnitCounter(state, acc)
        log_window = _LogWindow(self, objective, window, counter, state, warmup)
        model.train()

        with self._signals():
            if state.step == 0 and eval_loader is not None and cfg.eval_every > 0:
                log(self._evaluate(objective, model, eval_loader, tag="eval", counter=counter)[0])
            while state.step < total:
                step_start = time.perf_counter()
                step_log = self._train_step(objective, model, optimizer, batches, counter, window, state, total, warmup)
                state.train_seconds += time.perf_counter() - step_start
                bar.update(1)
                if startup is not None and "perf/startup_seconds" not in startup:
                    startup["perf/startup_seconds"] = process_age_seconds()

                if state.step % cfg.log_every == 0 or state.step == total:
                    record = log_window.record(step_log, batches_per_epoch)
                    if startup is not None:  # once a process, on its first training record
                        record.update(startup)
                        startup = None
                    if first_loss is None and "train/loss" in record:
                        first_loss = record["train/loss"]
                    log(record)
                    bar.set_postfix(loss=f"{record.get('train/loss', float('nan')):.4f}",
                                    sps=f"{record.get('throughput/samples_per_s', float('nan')):.1f}")

                is_last = state.step == total
                if eval_loader is not None and ((cfg.eval_every and state.step % cfg.eval_every == 0) or is_last):
                    final_metrics, predictions = self._evaluate(objective, model, eval_loader, tag="eval", counter=counter)
                    log(final_metrics)
                    self._keep_if_best(objective, model, state, final_metrics, predictions, best_name, is_last)
                    log_window.restart_clock()  # evaluation time is not training throughput
                if (cfg.save_every and state.step % cfg.save_every == 0) or is_last:
                    counter.sync()
                    self._save_checkpoint(state, window)
                if not is_last and self._should_stop():
                    counter.sync()
                    path = self._save_checkpoint(state, window)
                    bar.close()
                    self._finish_trackers()
                    raise TrainingInterrupted(
                        f"interrupted at step {state.step}/{total}; checkpoint saved to {path}. "
                        "Run the same command again to resume."
                    )
        bar.close()
        for unit, count in state.seen.items():
            if unit.startswith(SKIP_PREFIX) and count > 0:
                self.print(f"warning: {unit.removeprefix(SKIP_PREFIX).replace('_', ' ')}: {int(count)} skipped during "
                           "training and evaluation (all workers and processes; the first few are named above)")
        if not final_metrics and eval_loader is not None:  # resumed a run that had already finished
            final_metrics, predictions = self._evaluate(objective, model, eval_loader, tag="eval", counter=counter)
            self._keep_if_best(objective, model, state, final_metrics, predictions, best_name, True)
        best_step = self._kept_best_step(state, best_name)
        if self.accelerator.num_processes > 1:  # the main process's view of the folder decides, for all
            from accelerate.utils import broadcast_object_list

            best_step, state.best = broadcast_object_list([best_step, state.best])
        if best_step is not None:
            final_metrics = state.best["metrics"]
        self._export(objective, model, state, final_metrics, best_step)
        self._finish_trackers()
        self.release_output_dir()
        return FitResult(state, first_loss, {k.split("/", 1)[1]: v for k, v in final_metrics.items() if "/" in k}, history,
                         self._exported(objective, model), best_step, best_name,
                         len(train_data) if hasattr(train_data, "__len__") else None,
                         objective.lower_is_better(best_name) if best_name else False)

    def _kept_best_step(self, state: TrainerState, best_name: str) -> int | None:
        """The step of the best model kept in output_dir/model, or None when the last is exported."""
        if not (best_name and state.best):
            return None
        step = state.best["step"]
        if step != state.step and not (self.output_dir / MODEL_DIR).is_dir():
            self.print(f"warning: the best model (step {step}) is no longer in {self.output_dir / MODEL_DIR}; "
                       "exporting the last one instead")
            state.best = {}
            return None
        return step

    def _train_step(self, objective: Objective, model: nn.Module, optimizer: torch.optim.Optimizer,
                    batches: Iterator[Any], counter: _UnitCounter, window: MetricSums, state: TrainerState,
                    total: int, warmup: int) -> dict[str, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; a non-finite loss or gradient
        skips the update (weights, optimizer state and EMA modules stay as they were). Returns the
        step's values to log (lr, weight decay, grad norm, the objective's)."""
        cfg, acc = self.cfg, self.accelerator
        scheduled = apply_schedules(optimizer, cfg, state.step, total, warmup)
        nonfinite_loss = torch.zeros((), device=acc.device)
        for _ in range(cfg.grad_accum_steps):
            waited = time.perf_counter()
            batch = next(batches)
            self.data_wait_seconds += time.perf_counter() - waited
            counter.add(objective.count(batch))
            batch = _to_device(batch, acc.device, self._input_dtype)
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
        extra: dict[str, float] = {}
        # under DeepSpeed the engine has already stepped, or skipped a step with non-finite gradients
        engine_skipped = self.deepspeed and not model.was_step_applied()
        if bool(nonfinite_loss.item() > 0) or (cfg.mixed_precision != "fp16" and not math.isfinite(grad_norm_f)) \
                or (engine_skipped and cfg.mixed_precision != "fp16"):
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
            state.step += 1
        elif engine_skipped:  # fp16 under DeepSpeed: its loss scaler skipped an overflow and lowered the scale
            state.step += 1
        else:
            state.nonfinite_in_a_row = 0
            objective.before_optimizer_step(model, state.step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self._updates += 1
            self._whole = None  # stale: free the whole copy's memory until it is asked for again
            state.step += 1
            extra.update(objective.after_optimizer_step(model, state.step))
        extra.update(objective.on_step_end(state.step))
        return {**scheduled, "grad_norm": grad_norm_f, **extra}

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
    def _evaluate(self, objective: Objective, model: nn.Module, loader: Any, tag: str,
                  counter: _UnitCounter | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Eval metrics (over all processes) and, when the objective makes them, its predictions
        (``compute`` may return a ``predictions`` list in eval mode), gathered on the main process.
        Bad held-out inputs join the run's ``skipped_*`` totals through ``counter``: the objective
        counts each file once, so evaluating again adds nothing."""
        acc = self.accelerator
        model.eval()
        # ``compute`` gets the same (wrapped) model as in training. Processes may get unequal numbers
        # of eval batches: a DDP forward under no_grad starts no gradient collectives, and its buffer
        # broadcast is turned off here, so no process waits for another.
        ddp = _ddp_of(model)
        if ddp is not None:
            ddp.require_forward_param_sync = False
        sums = MetricSums()
        predictions: list[dict[str, Any]] = []
        batches = (sharding.lockstep(loader, self.cfg.eval_max_batches, acc) if self.sharded or self.deepspeed
                   else ((b, True) for b in itertools.islice(loader, self.cfg.eval_max_batches or None)))
        for batch, real in batches:
            if counter is not None and real:
                counter.add({u: n for u, n in objective.count(batch).items() if u.startswith(SKIP_PREFIX)})
            with acc.autocast():
                out = objective.compute(model, _to_device(batch, acc.device, self._input_dtype))
            if not real:  # a stand-in forward, so that a sharded model's processes gather together
                continue
            predictions.extend(out.pop("predictions", None) or [])
            sums.add(out)
        means = objective.summarize(sums.reduce(acc))
        record: dict[str, Any] = {f"{tag}/{k}": v for k, v in means.items()}
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            predictions = gather_object(predictions)
        exported = self._exported(objective, model)  # every process: a collective under FSDP
        if self.is_main:
            record.update({f"{tag}/{k}": v for k, v in objective.on_evaluate(exported).items()})
            for callback in self.callbacks:
                record.update(callback.on_evaluate(self, objective, exported))
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
        predictions_path = self.output_dir / PREDICTIONS_FILE
        if not best_name:
            write = self.is_main and bool(predictions) and is_last
            self._write_together((lambda: _write_jsonl(predictions_path, predictions)) if write else None,
                                 [_partial_file(predictions_path)])
            return
        value = record.get(f"eval/{best_name}")
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            known = sorted(k.split("/", 1)[1] for k, v in record.items() if isinstance(v, (int, float)))
            raise ConfigError(f"trainer.best_metric={best_name!r} is not an eval metric of {objective.name} "
                              f"(or is not finite); eval metrics: {', '.join(known)}")
        lower = objective.lower_is_better(best_name)
        best = state.best.get("value")
        if best is not None and not (value < best if lower else value > best):
            return
        state.best = {"step": state.step, "metric": best_name, "value": value,
                      "metrics": {k: v for k, v in record.items() if isinstance(v, (int, float, str))}}
        tmp = self.output_dir / f".{MODEL_DIR}.partial"
        exported = None if is_last else self._exported(objective, model)  # the last is exported anyway

        def write() -> None:
            if predictions:
                _write_jsonl(predictions_path, predictions)
            if exported is not None:
                self._swap_in_model(objective, exported, tmp)

        self._write_together(write if self.is_main else None, [_partial_file(predictions_path), tmp])

    def _swap_in_model(self, objective: Objective, exported: nn.Module, tmp: Path) -> None:
        """The model written whole beside output_dir/model, then swapped in: model/ is never half a
        model, and the one it replaces stays until the new one is complete."""
        shutil.rmtree(tmp, ignore_errors=True)
        objective.save_pretrained(exported, tmp)
        fsync_tree(tmp)
        shutil.rmtree(self.output_dir / MODEL_DIR, ignore_errors=True)
        os.replace(tmp, self.output_dir / MODEL_DIR)
        fsync_path(self.output_dir)

    def _exported(self, objective: Objective, model: nn.Module) -> nn.Module:
        """What is exported, probed and described. Under FSDP a collective (every process calls it):
        the main process gets a whole copy, on CPU, rebuilt from every process's shard; the others
        their own sharded model."""
        # keep_torch_compile=False: with True, Accelerate 1.16 points the compiled wrapper at the bare
        # model in place, so training went on past DDP (or DeepSpeed's engine) after the first export
        unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        if not (self.sharded or self.deepspeed):
            return objective.export(unwrapped)
        if self._whole is None or self._whole[0] != self._updates:  # the same on every process
            whole = (zero.full_state_dict(unwrapped, keep=self.is_main) if self.deepspeed
                     else sharding.full_state_dict(unwrapped))
            failure: Exception | None = None
            copy = None
            if self._replica is not None:
                try:
                    copy = self._replica.materialise(whole)
                except Exception as err:  # noqa: BLE001 - every process must learn of it, then it is raised
                    failure = err
            del whole
            failed = self.accelerator.reduce(torch.tensor([float(failure is not None)], device=self.device), "sum")
            if float(failed[0]) > 0:
                raise failure if failure is not None else TrainingError(
                    "the main process could not rebuild the whole model from the shards (its error is above)")
            self._whole = (self._updates, copy)
        copy = self._whole[1]
        if copy is None:  # not the main process: its own shard
            return objective.export(unwrapped)
        for mine, live in zip(copy.modules(), unwrapped.modules()):  # train/eval as the live model is
            mine.training = live.training
        return objective.export(copy)

    def _export(self, objective: Objective, model: nn.Module, state: TrainerState, final_metrics: dict[str, Any],
                kept_step: int | None = None) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        export = Export(self.output_dir / MODEL_DIR, self.output_dir, state, final_metrics, self.run_config,
                        self.output_dir / "metrics.jsonl")
        kept = kept_step is not None and kept_step != state.step  # model/ was written when it was the best
        if self.is_main and kept:
            self.print(f"exported the model of step {kept_step}, the best by eval/{state.best['metric']} "
                       f"({state.best['value']:.4g})")
        tmp = self.output_dir / f".{MODEL_DIR}.partial"
        exported = None if kept else self._exported(objective, model)
        self._write_together((lambda: self._swap_in_model(objective, exported, tmp)) if self.is_main and exported is not None
                             else None, [tmp])

        def on_export() -> None:  # the card and its figures, into the final model/
            for callback in self.callbacks:
                callback.on_export(self, objective, export)

        self._write_together(on_export if self.is_main else None, [export.model_dir], partial=[])
        if self.is_main:  # after the barrier: the other processes need not wait for uploads
            for callback in self.callbacks:
                callback.on_fit_end(self, objective, export)


def process_age_seconds() -> float:
    """Seconds since this process started (the OS's start time, so imports before multissl's count)."""
    import psutil

    return time.time() - psutil.Process().create_time()


class _LogWindow:
    """The training record of one log interval: metric means, the step's schedules, throughput of
    every counted unit, running totals of skipped inputs, and the objective's warnings."""

    def __init__(self, trainer: Trainer, objective: Objective, sums: MetricSums, counter: _UnitCounter,
                 state: TrainerState, warmup: int) -> None:
        self.trainer, self.objective, self.sums, self.counter = trainer, objective, sums, counter
        self.state, self.warmup = state, warmup
        self.seen_at_start = dict(state.seen)
        self._mark_step_time()
        self.restart_clock()

    def _mark_step_time(self) -> None:
        self.step_at_start, self.train_seconds_at_start = self.state.step, self.state.train_seconds
        self.data_wait_at_start = self.trainer.data_wait_seconds

    def perf(self) -> dict[str, float]:
        """Step time, the share of it spent waiting for the data loader (over 5% and the GPU waits
        for the input pipeline: more workers, or lighter collation), and on CUDA the peak memory,
        over this window's steps. Step times come from the steps themselves (``state.train_seconds``),
        so an evaluation inside the window does not count."""
        steps = self.state.step - self.step_at_start
        seconds = self.state.train_seconds - self.train_seconds_at_start
        perf: dict[str, float] = {}
        if steps > 0 and seconds > 0:
            perf = {"perf/step_seconds": seconds / steps,
                    "perf/data_fraction": min(1.0, (self.trainer.data_wait_seconds - self.data_wait_at_start) / seconds)}
        device = self.trainer.device
        if device.type == "cuda":
            perf["perf/max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        self._mark_step_time()
        return perf

    def restart_clock(self) -> None:
        self.start = time.perf_counter()

    def record(self, step_log: dict[str, float], batches_per_epoch: int | None) -> dict[str, Any]:
        state = self.state
        means = self.sums.reduce(self.trainer.accelerator)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.counter.sync()
        done = {u: v - self.seen_at_start.get(u, 0.0) for u, v in state.seen.items()}
        self.seen_at_start = dict(state.seen)
        record = {f"train/{k}": v for k, v in means.items() if not k.startswith("_")}  # _name: pooled for eval only
        record.update({
            **{f"train/{k}": v for k, v in step_log.items()},
            "train/epoch": state.epoch + state.batch_in_epoch / max(1, batches_per_epoch or 0),
            **{f"throughput/{u}_per_s": v / elapsed for u, v in done.items()
               if not u.startswith(SKIP_PREFIX) and (v > 0 or u == "samples")},
            **{f"data/{u}": v for u, v in state.seen.items() if u.startswith(SKIP_PREFIX) and v > 0},
            **self.perf(),
        })
        if state.nonfinite_total:
            record["train/nonfinite_steps"] = state.nonfinite_total
        warning = self.objective.on_log(means, state.step, self.warmup)
        if warning:
            self.trainer.print(f"warning: {warning}")
            record["train/warning"] = warning
        self.restart_clock()
        return record


class _UnitCounter:
    """This process's counts of every unit since the last sync, summed over processes into
    ``state.seen``; units reported as `BadInputs` count each distinct id once over the whole run."""

    def __init__(self, state: TrainerState, accelerator: Any) -> None:
        self.state, self.accelerator = state, accelerator
        self.units = sorted({"samples", *state.seen})
        self.unsynced = dict.fromkeys(self.units, 0.0)
        self.distinct = DistinctTally(state.skip_ids)

    def add(self, counts: dict[str, float | BadInputs]) -> None:
        for unit, value in counts.items():
            if unit not in self.unsynced:  # a unit first seen now: all processes see it in batch 1
                self.units = sorted([*self.units, unit])  # the same order everywhere, whatever came first
                self.unsynced[unit] = 0.0
            if isinstance(value, BadInputs):
                self.distinct.add(unit, value)
            else:
                self.unsynced[unit] += value

    def sync(self) -> None:
        """A collective: every process calls it at the same steps. The ids are exchanged only when
        some process has new ones (their count rides along with the sums)."""
        acc = self.accelerator
        values = [self.unsynced[u] for u in self.units] + [float(self.distinct.pending_count())]
        totals = torch.tensor(values, dtype=torch.float64, device=acc.device)
        if acc.num_processes > 1:
            totals = acc.reduce(totals, reduction="sum")
        *sums, pending = totals.tolist()
        for unit, value in zip(self.units, sums):
            self.state.seen[unit] = self.state.seen.get(unit, 0.0) + value
            self.unsynced[unit] = 0.0
        if pending > 0:
            for unit, new in self.distinct.sync(self._gather).items():
                self.state.seen[unit] = self.state.seen.get(unit, 0.0) + new
            self.state.skip_ids = self.distinct.state()

    def _gather(self, obj: Any) -> list[Any]:
        if self.accelerator.num_processes == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])


def _ddp_of(model: nn.Module) -> torch.nn.parallel.DistributedDataParallel | None:
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return inner if isinstance(inner, torch.nn.parallel.DistributedDataParallel) else None


def _partial_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Written whole, then renamed into place: a crash never leaves half a file."""
    tmp = _partial_file(path)
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def _write_state(path: Path, state: TrainerState) -> None:
    path.write_text(json.dumps(state.__dict__, indent=1), encoding="utf-8")


def _remove(path: Path) -> None:
    """A half-written folder or file, gone (best effort: the error being reported matters more)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


# The order Accelerate writes a checkpoint's files in (models, optimizers, schedulers, samplers,
# scaler, RNG states, registered objects), then ours: it breaks ties of modification times, which
# are as coarse as the kernel's clock tick.
_WRITE_ORDER = ("model", "pytorch_model", "optimizer", "scheduler", "sampler", "dl_state_dict", "scaler",
                "random_states", "custom_checkpoint", STATE_FILE)


def _write_rank(path: Path) -> int:
    return next((i for i, prefix in enumerate(_WRITE_ORDER) if path.name.startswith(prefix)), -1)


def _file_being_written(err: BaseException, writing: Sequence[Path], rank: int, is_main: bool) -> Path:
    """The file a failed write was writing: the one the error names, else the newest in ``writing``
    (a non-main process writes only its own RNG states), else the first of ``writing``."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.filename:
            return Path(e.filename)
        e = e.__cause__ or e.__context__
    files: list[Path] = []
    for place in writing:
        if place.is_dir():
            files += [p for p in place.rglob("*") if p.is_file()]
        elif place.is_file():
            files.append(place)
    own = [p for p in files if p.name == f"random_states_{rank}.pkl"]
    if not is_main and own:
        return own[0]
    if not files:
        return writing[0]

    def newest(p: Path) -> tuple[int, int]:
        try:
            return p.stat().st_mtime_ns, _write_rank(p)
        except OSError:
            return -1, -1

    return max(files, key=newest)


def _to_device(batch: Any, device: torch.device, floats: torch.dtype | None = None) -> Any:
    """Tensors inside dicts, lists and tuples (views of several sizes) moved to ``device``, floating
    ones cast to ``floats`` where given (DeepSpeed's half-precision weights take no fp32 input)."""
    if isinstance(batch, torch.Tensor):
        dtype = floats if floats is not None and batch.is_floating_point() else None
        return batch.to(device, dtype=dtype, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device, floats) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device, floats) for v in batch)
    return batch


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
