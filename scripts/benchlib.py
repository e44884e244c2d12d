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


def child_env(threads: int) -> dict[str, str]:
    """Same thread count for every side, offline, CPU only, the repository importable."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "ACCELERATE_USE_CPU": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT),
    }


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
