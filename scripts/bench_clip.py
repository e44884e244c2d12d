"""Benchmark: multissl's CLIP recipe vs open_clip's own trainer (``open_clip_train.main``), on CPU.

Our side (``multissl``) is the real recipe, ``recipes/clip.py``'s ``main`` with ``key=value``
overrides, as users run it. The other side (``open_clip_train``) is the training script shipped in
the ``open_clip_torch`` wheel, called in-process with its command line (``--dataset-type csv``,
``--device cpu``, ``--precision fp32``, ``--workers 0``) after our ``multissl-tiny`` model config is
registered with open_clip. Its ``data`` module imports ``braceexpand`` and ``webdataset`` at the
top (open_clip's [training] extra), which ``pip install -e '.[bench]'`` brings.

Both sides read ONE tab-separated CSV (``filepath``, ``title``: open_clip's default columns and
separator) written here from the training split of the embedded shapes corpus, one caption per image
(the first), so they see identical image-caption pairs. They start from the same weights (built once
here with a fixed seed and saved as an open_clip checkpoint file: ``model.pretrained`` on ours,
``--pretrained`` on theirs) and share the model, batch size, seed, step count, AdamW settings (lr,
weight decay on matrices only, betas, eps), gradient clipping at norm 1 (our default; theirs via
``--grad-clip-norm``), the logit-scale clamp at 100 after every step, and the warm-up + cosine
schedule (the two schedulers give the same lr at every step). open_clip_train counts epochs, not
steps: a csv epoch is ``floor(rows / batch)`` batches, so the CSV holds ``k x batch`` rows, ``k``
the largest divisor of ``--steps`` the training split allows, and it trains ``steps / k`` epochs.

Each side runs in its own process (so peak RSS is its own) with the same thread count; the sides
alternate over the repeats. Per side it reports:

* samples/s in steady state: a global optimizer step hook stamps the end of every optimizer step on
  both sides, and throughput is ``(steps - 1) x batch`` over the time from the end of step 1 to the
  end of the last step (no start-up, no final checkpoint);
* held-out zero-shot top-1/top-5 accuracy and image->text / text->image R@1 of the final model,
  from ONE evaluator shared by both sides: our objective's ``on_evaluate`` on the corpus's held-out
  split, loading our exported model folder or open_clip_train's final epoch checkpoint;
* train wall time (start-up, data loading, training and final save) and peak RSS (after training).

    python scripts/bench_clip.py [--steps 200] [--batch-size 64] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchlib import median_table, peak_rss_mb, run_alternating

SIDES = ("multissl", "open_clip_train")
MODEL = "multissl-tiny"
SEED, LR, WD, BETAS, EPS, CLIP_NORM, LOG_EVERY = 0, 1e-3, 0.2, (0.9, 0.98), 1e-6, 1.0, 10


def warmup_steps(steps: int) -> int:
    """10% of the run, as the tiny preset (30 of 300), at least 1."""
    return max(1, steps // 10)


def epoch_plan(steps: int, n_train: int, batch_size: int) -> tuple[int, int]:
    """``(batches per epoch, epochs)`` with ``batches x epochs == steps`` and ``batches x batch_size``
    rows at most ``n_train``: the largest divisor of ``steps`` that fits."""
    most = n_train // batch_size
    if most < 1:
        sys.exit(f"--batch-size {batch_size} is larger than the {n_train} training images")
    per_epoch = max(d for d in range(1, min(most, steps) + 1) if steps % d == 0)
    return per_epoch, steps // per_epoch


def _yaml_number(x: float) -> str:
    """A float that YAML reads back as a float (``1e-06`` would be a string to YAML 1.1)."""
    return f"{x:.12f}".rstrip("0")


# ----------------------------------------------------------------------------- shared evaluator
def _make_collator(transform: Any, tokenizer: Any, sample: bool) -> Any:
    from multissl.data.image_text import ImageTextCollator

    return ImageTextCollator(transform, tokenizer, sample_caption=sample)


def evaluate(pretrained: Path) -> dict[str, float]:
    """Zero-shot and retrieval on the shapes corpus's held-out split, by our objective's evaluator."""
    from multissl.data.image_text import ImageTextDataConfig, prepare_image_text
    from multissl.objectives.clip import ClipEvalConfig, ClipLossConfig, ClipModelConfig, ClipPretraining

    _, held_out = prepare_image_text(ImageTextDataConfig(), seed=SEED)
    objective = ClipPretraining(
        ClipModelConfig(name=MODEL, pretrained=str(pretrained)),
        ClipLossConfig(),
        ClipEvalConfig(),
        _make_collator,
    )
    objective.eval_data = held_out
    metrics = objective.on_evaluate(objective.model)
    keys = ("zero_shot_top1", "zero_shot_top5", "image_to_text_R@1", "text_to_image_R@1")
    return {k: float(metrics[k]) for k in keys} | {"held_out": len(held_out)}


# ----------------------------------------------------------------------------- one side
def _train_multissl(args: argparse.Namespace, out: Path) -> Path:
    """The recipe's ``main`` with overrides; returns the exported model folder."""
    from multissl_recipes.clip import main as clip_main

    clip_main(
        [
            f"model.name={MODEL}",
            f"model.pretrained={args.init}",
            f"data.csv={args.csv}",
            "data.image_key=filepath",
            "data.caption_key=title",
            "data.validation_fraction=0",
            f"trainer.output_dir={out}",
            f"trainer.seed={SEED}",
            f"trainer.max_steps={args.steps}",
            f"trainer.batch_size={args.batch_size}",
            f"trainer.lr={_yaml_number(LR)}",
            f"trainer.warmup_steps={warmup_steps(args.steps)}",
            "trainer.lr_schedule=cosine",
            f"trainer.weight_decay={_yaml_number(WD)}",
            f"trainer.adam_betas=[{_yaml_number(BETAS[0])},{_yaml_number(BETAS[1])}]",
            f"trainer.adam_eps={_yaml_number(EPS)}",
            f"trainer.max_grad_norm={_yaml_number(CLIP_NORM)}",
            f"trainer.log_every={LOG_EVERY}",
            "trainer.num_workers=0",
            "trainer.eval_every=0",
            "trainer.save_every=0",
            "trainer.progress_bar=false",
            "trainer.trackers=[]",
            "trainer.cpu=true",
        ]
    )
    return out / "model"


def _train_open_clip(args: argparse.Namespace, out: Path, extra: Sequence[str] = ()) -> Path:
    """open_clip_train's ``main`` with its command line; returns the final epoch checkpoint. ``extra``
    options come last, so they override ours (argparse keeps the last value): ``--device cuda
    --precision amp_bf16 --torchcompile --model ViT-B-32`` in scripts/bench_gpu.py."""
    import open_clip

    try:
        from open_clip_train import main as oc_main
    except ImportError as err:  # its data module needs the [training] extra's webdataset and braceexpand
        sys.exit(f"open_clip_train cannot be imported ({err}); pip install -e '.[bench]'")

    from multissl.objectives.clip import CONFIG_DIR

    open_clip.add_model_config(CONFIG_DIR)  # so that --model multissl-tiny resolves
    epochs = args.steps // args.batches_per_epoch
    argv = [
        "--train-data", args.csv,
        "--dataset-type", "csv",
        "--csv-separator", "\t",
        "--csv-img-key", "filepath",
        "--csv-caption-key", "title",
        "--model", MODEL,
        "--pretrained", args.init,
        "--device", "cpu",
        "--precision", "fp32",
        "--workers", "0",
        "--batch-size", str(args.batch_size),
        "--epochs", str(epochs),
        "--lr", str(LR),
        "--wd", str(WD),
        "--beta1", str(BETAS[0]),
        "--beta2", str(BETAS[1]),
        "--eps", str(EPS),
        "--warmup", str(warmup_steps(args.steps)),
        "--lr-scheduler", "cosine",
        "--grad-clip-norm", str(CLIP_NORM),
        "--seed", str(SEED),
        "--logs", str(out),
        "--name", "run",
        "--save-frequency", "0",  # the final epoch is saved anyway; no saves mid-run
        "--zeroshot-frequency", "0",
        "--report-to", "",
        "--log-every-n-steps", str(LOG_EVERY),
        *extra,
    ]  # fmt: skip
    if oc_main.main(argv) == -1:
        sys.exit("open_clip_train refused to run (an experiment of that name exists?)")
    checkpoint = out / "run" / "checkpoints" / f"epoch_{epochs}.pt"
    if not checkpoint.is_file():
        sys.exit(f"open_clip_train wrote no final checkpoint at {checkpoint}")
    return checkpoint


def run_side(side: str, args: argparse.Namespace) -> dict[str, Any]:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from multissl.cli import quiet_libraries

    quiet_libraries()
    stamps: list[float] = []
    # The end of every optimizer step, the same way on both sides (one optimizer per process).
    hook = register_optimizer_step_post_hook(lambda opt, a, kw: stamps.append(time.perf_counter()))
    out = Path(args.work) / f"{side}-{args.rep}"
    start = time.perf_counter()
    final = _train_multissl(args, out) if side == "multissl" else _train_open_clip(args, out)
    train_s = time.perf_counter() - start
    hook.remove()
    rss_mb = peak_rss_mb()  # before evaluation
    if len(stamps) != args.steps:
        sys.exit(f"{side}: {len(stamps)} optimizer steps, expected {args.steps}")
    result = {
        "side": side,
        "steps": len(stamps),
        "samples_per_s": (len(stamps) - 1) * args.batch_size / (stamps[-1] - stamps[0]),
        "train_s": train_s,
        "peak_rss_mb": rss_mb,
        **evaluate(final),
    }
    shutil.rmtree(out, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------- driver
def write_train_csv(work: Path, steps: int, batch_size: int, min_pairs: int = 0) -> tuple[Path, int, int, int, int]:
    """``work/train.csv``: the first ``batches x batch_size`` training pairs of the embedded shapes
    corpus, one caption each, in the format both sides read. The corpus is listed as many times as
    it takes to hold ``min_pairs``, each image under as many names (symbolic links in
    ``work/images``): a path is an image to both sides (ours merges rows naming the same file), so
    epochs get longer and the images are read as often as before. Returns ``(csv, batches per
    epoch, epochs, training pairs, held-out images)``."""
    from multissl.data.image_text import ImageTextDataConfig, prepare_image_text

    train, held_out = prepare_image_text(ImageTextDataConfig(), seed=SEED)
    repeat = max(1, -(-min_pairs // len(train)))
    paths, caption_lists = list(train.data["path"]) * repeat, list(train.data["captions"]) * repeat
    if repeat > 1:
        (work / "images").mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(paths):
            link = work / "images" / f"{i:07d}{Path(path).suffix}"
            link.symlink_to(Path(path).absolute())
            paths[i] = str(link)
    per_epoch, epochs = epoch_plan(steps, len(paths), batch_size)
    rows = per_epoch * batch_size
    lines = ["filepath\ttitle"]
    for path, captions in zip(paths[:rows], caption_lists[:rows]):
        caption = captions[0]
        if any(c in caption + path for c in '\t\n"'):
            sys.exit(f"cannot write {path!r} / {caption!r} to a tab-separated CSV")
        lines.append(f"{path}\t{caption}")
    csv = work / "train.csv"
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv, per_epoch, epochs, len(paths), len(held_out or [])


def prepare(work: Path, args: argparse.Namespace) -> tuple[str, str, int, int]:
    """The shared CSV and initial weights; returns ``(csv, init, batches per epoch, epochs)``."""
    import torch

    from multissl.cli import quiet_libraries
    from multissl.objectives.clip import ClipLossConfig, ClipModelConfig, build_clip

    quiet_libraries()
    csv, per_epoch, epochs, n_train, n_held = write_train_csv(work, args.steps, args.batch_size)
    rows = per_epoch * args.batch_size

    torch.manual_seed(SEED)
    model = build_clip(ClipModelConfig(name=MODEL), ClipLossConfig())[0]
    init = work / "init.pt"
    torch.save({"state_dict": model.state_dict()}, init)
    print(
        f"{rows} of {n_train} training images in the CSV ({per_epoch} batches of {args.batch_size} x "
        f"{epochs} epochs = {args.steps} steps), {n_held} held-out images for the evaluator, "
        f"warm-up {warmup_steps(args.steps)} steps",
        flush=True,
    )
    if rows < n_train // 2:
        print(
            f"warning: {args.steps} steps has no divisor near {n_train // args.batch_size} batches per "
            "epoch; pick a step count with one to train on more of the images",
            flush=True,
        )
    return str(csv), str(init), per_epoch, epochs


ROWS: tuple[tuple[str, str, str], ...] = (
    ("samples_per_s", "samples/s (steady state)", "{:.1f}"),
    ("zero_shot_top1", "held-out zero-shot top-1", "{:.4f}"),
    ("zero_shot_top5", "held-out zero-shot top-5", "{:.4f}"),
    ("image_to_text_R@1", "held-out image->text R@1", "{:.4f}"),
    ("text_to_image_R@1", "held-out text->image R@1", "{:.4f}"),
    ("train_s", "train wall time incl. start-up (s)", "{:.1f}"),
    ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--csv", help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    parser.add_argument("--batches-per-epoch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rep", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (throughput is timed from the end of step 1)")

    if args.side:
        import torch

        torch.set_num_threads(args.threads)
        Path(args.out).write_text(json.dumps(run_side(args.side, args)), encoding="utf-8")
        return

    work = Path(tempfile.mkdtemp(prefix="bench_clip_"))
    csv, init, per_epoch, epochs = prepare(work, args)

    def child_args(side: str, rep: int, out: Path) -> list[str]:
        return [
            __file__,
            "--side",
            side,
            "--out",
            str(out),
            "--work",
            str(work),
            "--csv",
            csv,
            "--init",
            init,
            "--batches-per-epoch",
            str(per_epoch),
            "--rep",
            str(rep),
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--threads",
            str(args.threads),
        ]

    def report(side: str, rep: int, r: dict[str, Any]) -> str:
        return (
            f"{r['samples_per_s']:.1f} samples/s, zero-shot top-1 {r['zero_shot_top1']:.4f}, "
            f"i->t R@1 {r['image_to_text_R@1']:.4f}, t->i R@1 {r['text_to_image_R@1']:.4f}"
        )

    results = run_alternating(SIDES, args.repeats, work, args.threads, child_args, report)
    print(
        f"\n{args.steps} steps ({per_epoch} batches x {epochs} epochs), batch {args.batch_size}, model {MODEL}, "
        f"CPU, {args.threads} threads, num_workers=0, fp32, {args.repeats} repeats (median [min-max]); "
        f"held-out: {results[SIDES[0]][0]['held_out']} images\n"
    )
    print(median_table(results, SIDES, ROWS))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
