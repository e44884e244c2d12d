"""Benchmark: multissl's MLM/CLM recipes vs Hugging Face's Trainer vs a bare PyTorch loop.

Same tiny model (same initial weights), same packed data and tokenizer, batch, seed, schedule and
step count, and the same fused AdamW kernel (ours on CPU and HF's ``TrainingArguments`` default,
``adamw_torch_fused``). Each side runs in its own process (so peak RSS is its own) and the sides alternate
over several repeats. Throughput is timed from the end of the first step to the end of the last
(steady state, no start-up), and every final model is scored by the same evaluator: the
held-out split with fixed masks. The bare loop runs twice: as a user writes it, and with the
trainer's host-memory setting (``bare_kept``), so the trainer's own overhead is measured apart from
what that setting buys; faults/step counts the minor page faults between the first and last step.

    python scripts/bench_text.py [--recipes mlm clm] [--steps 100] [--repeats 3] [--threads 2] [--sides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import hf_training_args, peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("multissl", "hf_trainer", "bare_loop", "bare_kept")
"""bare_kept: the bare loop with the trainer's host-memory setting (multissl.training.host_malloc)."""
BATCH, SEQ, LR, WARMUP, SEED = 32, 128, 1e-3, 10, 0


# ----------------------------------------------------------------------------- one side
def _data(recipe: str, tok_dir: str):
    from multissl.data.text import TextDataConfig, prepare_text

    cfg = TextDataConfig(tokenizer=tok_dir, max_seq_len=SEQ)
    return prepare_text(cfg, recipe, tempfile.mkdtemp(), SEED)


def _objective(recipe: str, tokenizer: Any):
    from multissl.objectives.clm import CausalLM
    from multissl.objectives.language_model import TextModelConfig
    from multissl.objectives.mlm import MaskedLM, MaskingConfig

    if recipe == "mlm":
        return MaskedLM(TextModelConfig(arch="bert", dropout=0.0), MaskingConfig(), tokenizer, SEQ)
    return CausalLM(TextModelConfig(arch="gpt2", dropout=0.0), tokenizer, SEQ)


def _evaluate(objective: Any, model: Any, eval_data: Any) -> float:
    """Token-weighted eval loss with fixed masks: the same yardstick for every side."""
    import torch

    from multissl.metrics import MetricSums
    from multissl.training.loader import make_loader

    loader, _ = make_loader(eval_data, BATCH, objective.eval_collator(), seed=SEED, shuffle=False, drop_last=False,
                            rank=0, world_size=1, split_tag=1)
    sums = MetricSums()
    model.eval()
    with torch.no_grad():
        for batch in loader:
            sums.add(objective.compute(model, batch))
    return sums.reduce(None)["loss"]


def _padding(batch: dict) -> tuple[int, int]:
    mask = batch["attention_mask"]
    return int((mask == 0).sum()), int(mask.numel())


def run_side(side: str, recipe: str, steps: int, tok_dir: str) -> dict[str, Any]:
    import torch
    from accelerate.utils import set_seed

    from multissl.cli import quiet_libraries

    quiet_libraries()
    data = _data(recipe, tok_dir)
    stamps: list[float] = []
    faults: list[int] = []  # minor page faults at each stamp: fresh pages the allocator had to map
    pad = [0, 0]

    def stamp() -> None:
        stamps.append(time.perf_counter())
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

    if side == "multissl":
        from multissl.training.trainer import Trainer, TrainerConfig

        out = tempfile.mkdtemp()
        trainer = Trainer(TrainerConfig(output_dir=out, max_steps=steps, batch_size=BATCH, lr=LR, warmup_steps=WARMUP,
                                        seed=SEED, trackers=[], progress_bar=False, log_every=10**9, cpu=True))
        objective = _objective(recipe, data.tokenizer)
        collate = objective.collator()

        def counting_collate(samples, generator):
            batch = collate(samples, generator)
            p, n = _padding(batch)
            pad[0] += p
            pad[1] += n
            return batch

        objective.collator = lambda: counting_collate  # count training batches only (workers: none here)
        objective.on_step_end = lambda step: stamp() or {}
        trainer.fit(objective, data.train, None)
    elif side == "hf_trainer":
        from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback

        set_seed(SEED)
        objective = _objective(recipe, data.tokenizer)
        hf_collator = DataCollatorForLanguageModeling(data.tokenizer, mlm=recipe == "mlm", mlm_probability=0.15)

        def collator(features):
            batch = hf_collator(features)
            p, n = _padding(batch)
            pad[0] += p
            pad[1] += n
            return batch

        class Stamp(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                stamp()

        args = hf_training_args(tempfile.mkdtemp(), BATCH, steps, LR, WARMUP, SEED)
        # HF's Trainer gets the plain transformers model (full-vocabulary logits at every position)
        Trainer(model=objective.export(objective.model), args=args, train_dataset=data.train,
                data_collator=collator, callbacks=[Stamp()]).train()
    else:
        from multissl.training.host_malloc import keep_freed_host_memory
        from multissl.training.loader import make_loader
        from multissl.training.schedules import lr_factor

        if side == "bare_kept":
            keep_freed_host_memory()
        set_seed(SEED)
        objective = _objective(recipe, data.tokenizer)
        model = objective.model
        decay = [p for p in model.parameters() if p.ndim >= 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                 {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}], lr=LR,
                                fused=True)  # the kernel both other sides use (ours and HF's default)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor("cosine", s, WARMUP, steps, 0.0))
        loader, pos = make_loader(data.train, BATCH, objective.collator(), seed=SEED, shuffle=True, drop_last=True,
                                  rank=0, world_size=1, split_tag=0)
        model.train()
        step, epoch = 0, 0
        while step < steps:
            pos.set_epoch(epoch)
            for batch in loader:
                p, n = _padding(batch)
                pad[0] += p
                pad[1] += n
                loss = objective.compute(model, batch)["loss"].value
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                stamp()
                if step == steps:
                    break
            epoch += 1

    eval_loss = _evaluate(objective, objective.model, data.eval)  # trained in place on every side
    seconds = stamps[-1] - stamps[0]
    rss_mb = peak_rss_mb()
    return {
        "side": side, "recipe": recipe, "steps": len(stamps),
        "samples_per_s": (len(stamps) - 1) * BATCH / seconds,
        "eval_loss": eval_loss, "padding": pad[0] / max(1, pad[1]), "peak_rss_mb": rss_mb,
        "faults_per_step": (faults[-1] - faults[0]) / max(1, len(faults) - 1),
    }


# ------------------------------------------------------------------------------ driver
def prepare_tokenizers(work: Path) -> dict[str, str]:
    from multissl.data.demo import demo_text_splits
    from multissl.data.text import train_tokenizer

    train, _ = demo_text_splits()
    texts = list(train["text"])
    dirs = {}
    for recipe in ("mlm", "clm"):
        d = work / f"tok-{recipe}"
        train_tokenizer(texts, recipe, 4096, SEQ, lowercase=False).save_pretrained(d)
        dirs[recipe] = str(d)
    return dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["mlm", "clm"], choices=["mlm", "clm"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(run_side(args.side, args.recipes[0], args.steps, args.tokenizer)))
        return

    work = Path(tempfile.mkdtemp(prefix="bench_text_"))
    toks = prepare_tokenizers(work)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for recipe in args.recipes:
        for rep in range(args.repeats):
            sides = [s for s in SIDES if s in args.sides]
            order = sides if rep % 2 == 0 else sides[::-1]  # alternate who goes first
            for side in order:
                cmd = [sys.executable, __file__, "--side", side, "--recipes", recipe, "--steps", str(args.steps),
                       "--threads", str(args.threads), "--tokenizer", toks[recipe]]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    sys.exit(f"{side}/{recipe} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(line[len("RESULT "):])
                results.setdefault((recipe, side), []).append(r)
                print(f"  {recipe} {side:10s} rep {rep + 1}: {r['samples_per_s']:.1f} samples/s, "
                      f"eval loss {r['eval_loss']:.4f}", flush=True)

    print(f"\n{args.steps} steps, batch {BATCH} x {SEQ} tokens, {args.threads} threads, {args.repeats} repeats "
          "(median [min-max])\n")
    head = (f"{'recipe':6s} {'side':10s} {'samples/s':>24s} {'vs HF':>6s} {'vs bare':>7s} {'vs kept':>7s} "
            f"{'eval loss':>9s} {'padding':>8s} {'peak RSS':>9s} {'faults/step':>11s}")
    print(head)
    print("-" * len(head))
    for recipe in args.recipes:
        med = {s: statistics.median(r["samples_per_s"] for r in results[(recipe, s)]) for s in args.sides}
        for s in SIDES:
            med.setdefault(s, float("nan"))
        for side in (s for s in SIDES if s in args.sides):
            rs = results[(recipe, side)]
            sps = [r["samples_per_s"] for r in rs]
            print(f"{recipe:6s} {side:10s} {med[side]:9.1f} [{min(sps):6.1f}-{max(sps):6.1f}] "
                  f"{med[side] / med['hf_trainer']:6.2f} {med[side] / med['bare_loop']:7.2f} "
                  f"{med[side] / med['bare_kept']:7.2f} "
                  f"{statistics.median(r['eval_loss'] for r in rs):9.4f} "
                  f"{statistics.median(r['padding'] for r in rs):8.4f} "
                  f"{statistics.median(r['peak_rss_mb'] for r in rs):7.0f}MB "
                  f"{statistics.median(r['faults_per_step'] for r in rs):11.0f}")


if __name__ == "__main__":
    main()
