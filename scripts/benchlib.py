"""What the side-by-side benchmarks share: children in their own processes, sides alternating
who goes first, and a Markdown table of medians with their spread and the ratio ours/theirs."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
Row = tuple[str, str, str]  # (result key, label, format)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB, its own only. ``getrusage``'s ``ru_maxrss`` is no use
    in a child: Linux carries the parent's high-water mark across fork and exec, so a child of a
    1 GB parent reports at least 1 GB. ``VmHWM`` belongs to the process's own address space, which
    exec makes new; ``ru_maxrss`` only where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fingerprint(tensors: Sequence[Any]) -> list[str]:
    """Shape and hash of each tensor, sorted: equal lists mean equal tensors (in any order)."""
    import hashlib

    return sorted(f"{tuple(p.shape)}:{hashlib.sha1(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]}"
                  for p in tensors)


def timed_training(side: str, train: Callable[[], Any], before_step: Callable[[Any], None], steps: int,
                   batch_size: int) -> tuple[Any, dict[str, Any]]:
    """Run ``train()`` with global optimizer-step hooks: ``before_step(optimizer)`` before every step, a
    timestamp after it. Returns ``(what train returned, {"steps", "samples_per_s", "train_s",
    "peak_rss_mb"})``; samples/s is steady state, ``(steps - 1) x batch`` between the first and the
    last step's end (start-up and the first step left out). Exits unless exactly ``steps`` ran."""
    import time

    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    stamps: list[float] = []
    pre = register_optimizer_step_pre_hook(lambda opt, a, kw: before_step(opt))
    post = register_optimizer_step_post_hook(lambda opt, a, kw: stamps.append(time.perf_counter()))
    start = time.perf_counter()
    try:
        result = train()
    finally:
        pre.remove()
        post.remove()
    train_s = time.perf_counter() - start
    rss_mb = peak_rss_mb()  # before any evaluation
    if len(stamps) != steps:
        sys.exit(f"{side}: {len(stamps)} optimizer steps, expected {steps}")
    return result, {"steps": len(stamps), "samples_per_s": (len(stamps) - 1) * batch_size / (stamps[-1] - stamps[0]),
                    "train_s": train_s, "peak_rss_mb": rss_mb}


def child_env(threads: int | None, cpu_only: bool = True) -> dict[str, str]:
    """Same thread count for every side (None: the library defaults), offline, the repository
    importable; CPU only unless ``cpu_only`` is False (scripts/bench_gpu.py on a GPU)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if cpu_only:
        env.update({"ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""})
    else:
        env.pop("ACCELERATE_USE_CPU", None)  # set by the test suite's conftest, for one
    return env


class StepClock:
    """Optimizer-step end times, and the batches any DataLoader of this process hands out: how long
    the loop waited for each and its size in the workload's unit (``units(batch)``).

    One yardstick for training loops we do not own (HF's Trainer, open_clip_train, the wav2vec2
    example): none reports its step time and data wait in a form we can read, but all step a torch
    optimizer once per batch of a DataLoader. Batch ``i`` is taken to be trained in step ``i + 1``
    (no gradient accumulation); a loader that fetches ahead shifts waits by a step, not their sum."""

    def __init__(self, units: Callable[[Any], float]) -> None:
        self.units = units
        self.stamps: list[float] = []
        self.waited_at_stamp: list[float] = []
        self.batch_units: list[float] = []
        self.waited = 0.0
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> StepClock:
        import time

        from torch.optim.optimizer import register_optimizer_step_post_hook
        from torch.utils.data.dataloader import _BaseDataLoaderIter

        original = _BaseDataLoaderIter.__next__

        def timed_next(iterator: Any) -> Any:
            start = time.perf_counter()
            try:
                batch = original(iterator)
            finally:
                self.waited += time.perf_counter() - start
            self.batch_units.append(float(self.units(batch)))
            return batch

        def on_step(optimizer: Any, args: Any, kwargs: Any) -> None:
            self.stamps.append(time.perf_counter())
            self.waited_at_stamp.append(self.waited)

        _BaseDataLoaderIter.__next__ = timed_next  # every loader kind iterates through this method
        hook = register_optimizer_step_post_hook(on_step)
        self._undo = [lambda: setattr(_BaseDataLoaderIter, "__next__", original), hook.remove]
        return self

    def __exit__(self, *exc: object) -> None:
        for undo in self._undo:
            undo()
        self._undo = []

    def window(self, skip: int) -> dict[str, float]:
        """Steps ``skip + 1`` to the last, timed from the end of step ``skip`` (warm-up and
        compilation left out): ``steps``, ``step_seconds``, ``units_per_s`` and ``data_fraction``
        (the share of the window spent waiting for batches)."""
        n = len(self.stamps)
        if not 1 <= skip < n:
            raise ValueError(f"{n} optimizer steps timed; need more than the {skip} skipped (and skip >= 1)")
        seconds = self.stamps[-1] - self.stamps[skip - 1]
        waited = self.waited_at_stamp[-1] - self.waited_at_stamp[skip - 1]
        return {"steps": n - skip, "step_seconds": seconds / (n - skip),
                "units_per_s": sum(self.batch_units[skip:n]) / seconds,
                "data_fraction": min(1.0, waited / seconds)}


def hf_training_args(output_dir: str, batch_size: int, steps: int, lr: float, warmup: int, seed: int, *,
                     cuda: bool = False, bf16: bool = False, compile: bool = False, workers: int = 0) -> Any:
    """HF ``TrainingArguments`` for a timed run: no saving, evaluation, logging, reporting or
    progress bar; AdamW fused (HF's default), cosine schedule, clipping at 1; on CUDA optionally
    with bf16 autocast and ``torch.compile``, HF's own switches for speed."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=lr,
        warmup_steps=warmup, lr_scheduler_type="cosine", weight_decay=0.01, max_grad_norm=1.0, seed=seed,
        save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none", use_cpu=not cuda,
        disable_tqdm=True, dataloader_num_workers=workers, optim="adamw_torch_fused", bf16=bf16,
        torch_compile=compile,
    )


def run_alternating(
    sides: Sequence[str],
    repeats: int,
    work: Path,
    threads: int,
    child_args: Callable[[str, int, Path], list[str]],
    report: Callable[[str, int, dict[str, Any]], str],
) -> dict[str, list[dict[str, Any]]]:
    """Run ``python <script> <child_args(side, rep, out)>`` for every side and repeat, the order
    reversed on odd repeats (so neither side always runs on a cooler machine); each child writes its
    result as JSON to ``out``. ``report`` makes the progress line printed after each run."""
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    env = child_env(threads)
    for rep in range(repeats):
        for side in sides if rep % 2 == 0 else tuple(reversed(sides)):
            out = work / f"{side}-{rep}.json"
            proc = subprocess.run(
                [sys.executable, *child_args(side, rep, out)],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
            )
            if proc.returncode != 0 or not out.is_file():
                sys.exit(f"{side} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
            result = json.loads(out.read_text(encoding="utf-8"))
            results[side].append(result)
            print(f"  {side:15s} rep {rep + 1}: {report(side, rep, result)}", flush=True)
    return results


def median_table(results: dict[str, list[dict[str, Any]]], sides: Sequence[str], rows: Sequence[Row],
                 ratio_keys: Collection[str] | None = None) -> str:
    """Markdown: one row per metric, median [min-max] per side, and the ratio of the first two medians
    (only for the keys in ``ratio_keys`` when given, "-" elsewhere)."""
    ours, theirs = sides[0], sides[1]
    lines = [f"| metric | {' | '.join(sides)} | {ours} / {theirs} |", "|---|" + "---:|" * (len(sides) + 1)]
    for key, label, fmt in rows:
        cells, medians = [], []
        for side in sides:
            values = [r[key] for r in results[side]]
            med = statistics.median(values)
            medians.append(med)
            cells.append(f"{fmt.format(med)} [{fmt.format(min(values))}-{fmt.format(max(values))}]")
        wanted = ratio_keys is None or key in ratio_keys
        ratio = f"{medians[0] / medians[1]:.2f}" if medians[1] and wanted else "-"
        lines.append(f"| {label} | {' | '.join(cells)} | {ratio} |")
    return "\n".join(lines)
