"""Start-up: how long a user waits for ``multissl --help`` and for each recipe's first training step.

* ``multissl --help``: wall time of the console script, in a fresh process each time, and whether it
  imported torch (it must not: the CLI imports what a command needs when it runs it).
* Each recipe: ``multissl pretrain NAME`` with its default (tiny) preset on the embedded data, 2
  steps, no evaluation before training, no probe, logging every step, in a fresh output folder (so
  a tokenizer is trained again, as on a first run). The trainer logs, on its first training record,
  ``perf/before_fit_seconds`` (process start to ``Trainer.fit``: imports, config, data preparation,
  tokenizer training) and ``perf/startup_seconds`` (to the end of the first optimizer step: the model,
  the data loaders and the first batch on top); this reads them from the run's ``metrics.jsonl``.

Median [min-max] of ``--repeats`` fresh processes per row, one recipe after another, with nothing
else running. The first run after an install also writes the embedded corpora to the cache.

    python scripts/bench_startup.py [--recipes mlm,clm,wav2vec2,clip,simclr,mae] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("mlm", "clm", "wav2vec2", "clip", "simclr", "mae")
STARTUP_KEYS = ("perf/before_fit_seconds", "perf/startup_seconds")


def cli() -> list[str]:
    """The installed console script beside this Python (what a user types), else ``python -m multissl.cli``."""
    script = Path(sys.executable).with_name("multissl")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "multissl.cli"]


def help_run(env: dict[str, str]) -> dict[str, float | bool]:
    """One ``multissl --help``: its wall time, and whether torch was imported on the way (``-X importtime``)."""
    start = time.perf_counter()
    done = subprocess.run([*cli(), "--help"], env=env, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    traced = subprocess.run([sys.executable, "-X", "importtime", "-m", "multissl.cli", "--help"], env=env,
                            capture_output=True, text=True, check=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in traced.stderr.splitlines() if line.startswith("import time:")}
    return {"seconds": seconds, "torch_imported": "torch" in imported, "ok": "pretrain" in done.stdout}


def recipe_run(name: str, env: dict[str, str]) -> dict[str, float]:
    """One fresh 2-step run of ``name``'s tiny preset: the trainer's start-up times and the whole wall time."""
    with tempfile.TemporaryDirectory(prefix=f"startup_{name}_") as out:
        args = [*cli(), "pretrain", name, f"trainer.output_dir={out}", "trainer.max_steps=2", "trainer.log_every=1",
                "trainer.eval_every=0", "trainer.progress_bar=false", "probe.task="]
        start = time.perf_counter()
        done = subprocess.run(args, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode:
            sys.exit(f"{name} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first = next((r for r in rows if STARTUP_KEYS[1] in r), None)
    if first is None:
        sys.exit(f"{name}: no {STARTUP_KEYS[1]} in its metrics.jsonl")
    return {"before_fit_s": first[STARTUP_KEYS[0]], "first_step_s": first[STARTUP_KEYS[1]], "wall_s": wall}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    helps = [help_run(env) for _ in range(max(args.repeats, 5))]
    if not all(h["ok"] for h in helps):
        sys.exit("multissl --help did not list the pretrain command")
    print(f"multissl --help: {spread([float(h['seconds']) for h in helps])} s; torch imported: "
          f"{any(h['torch_imported'] for h in helps)}", flush=True)

    lines = ["| recipe | process start -> Trainer.fit (s) | -> end of first step (s) | whole 2-step run (s) |",
             "|---|---:|---:|---:|"]
    for name in args.recipes.split(","):
        runs = []
        for rep in range(args.repeats):
            runs.append(recipe_run(name, env))
            print(f"  {name} rep {rep + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[-1].items()), flush=True)
        lines.append(f"| {name} | " + " | ".join(spread([r[k] for r in runs]) for k in ("before_fit_s", "first_step_s",
                                                                                        "wall_s")) + " |")
    print(f"\n{args.threads} threads, median [min-max] of {args.repeats} fresh processes\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
