"""Benchmark: multissl's wav2vec 2.0 recipe vs a loop doing what Hugging Face's pretraining example does.

The reference is ``examples/pytorch/speech-pretraining/run_wav2vec2_pretraining_no_trainer.py`` in
`transformers`, reimplemented here (``hf_example``): a fixed number of utterances per batch in random
order, each decoded, cropped and normalised by ``Wav2Vec2FeatureExtractor``, padded by its ``pad``,
then numpy span masks (``_compute_mask_indices``) and distractors (``_sample_negative_indices``) per
batch, the model's own loss divided by the masked frames, the example's Gumbel annealing, on
transformers' own ``Wav2Vec2ForPreTraining`` (checked: no multissl module in it). Our side
(``multissl``) is the real recipe: ``prepare_audio`` (duration batches under a samples budget), the
``Wav2Vec2Pretraining`` objective and our ``Trainer``, with the recipe's optimizer settings and
model (its feature encoder's layer-norm conv layers in our faster layout, ``multissl.models.conv_features``:
the same parameters and function).

Both sides start from the same weights (made once here and loaded by each side), train on the same
utterances (the training split of the embedded speech demo corpus) for the same number of steps
with the same seed, optimizer settings, thread count and ``num_workers=0``, and a linear (10% of the steps)
warm-up then linear decay (each side's own scheduler: HF's starts the warm-up at lr 0, ours at
lr/10). Each side runs in its own process; the sides alternate over the repeats. Per side it reports:

* audio-seconds/s: unpadded audio trained on per second, from the end of the first step to the end
  of the last (steady state, no start-up);
* padding: padded samples' share of the batches actually trained on;
* collation share: time spent producing batches in the main process (sampler, row fetch, decoding,
  cropping, normalising, padding, masks and distractors) over the same steady-state window;
* contrastive accuracy and codevector perplexity on the held-out split, after training, from ONE
  evaluator shared by both sides (our objective's eval collation, with fixed crops, masks and
  distractors); the perplexity shows whether accuracy is inflated by a collapsed codebook.

    python scripts/bench_audio.py [--steps 100] [--repeats 3] [--threads 2] [--max-seconds 5.0]
                                  [--max-batch-samples 400000] [--batch-size N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchlib import median_table, peak_rss_mb, run_alternating

SIDES = ("multissl", "hf_example")
SEED, RATE = (
    int(os.environ.get("BENCH_SEED", "0")),
    16000,
)  # BENCH_SEED=N repeats the comparison from another start
MIN_MASKS = 2  # the example leaves min_masks at 0; immaterial here: a >= 1 s utterance gets >= 3 spans


# ----------------------------------------------------------------------------- shared set-up
def _configs(max_seconds: float, max_batch_samples: int) -> tuple[Any, Any, Any]:
    """Data, model and loss settings of the tiny preset (recipes/configs/wav2vec2/tiny.yaml), dropout off."""
    from multissl_recipes.wav2vec2 import DEFAULT_CONFIG, Wav2Vec2Config

    from multissl import config

    cfg = config.load(
        Wav2Vec2Config,
        [
            f"data.max_seconds={max_seconds}",
            f"data.max_batch_samples={max_batch_samples}",
            "model.dropout=0.0",
        ],
        DEFAULT_CONFIG,
    )
    return cfg.data, cfg.model, cfg.loss


def warmup_steps(steps: int) -> int:
    """10% of the run, as the tiny preset (60 of 600), at least 10."""
    return max(10, steps // 10)


def _recipe_trainer(output_dir: str, steps: int) -> Any:
    """The tiny preset's trainer settings (lr, betas, eps, schedule, clipping), made short and quiet."""
    from multissl_recipes.wav2vec2 import DEFAULT_CONFIG, Wav2Vec2Config

    from multissl import config

    return replace(
        config.load(Wav2Vec2Config, [], DEFAULT_CONFIG).trainer,
        output_dir=output_dir,
        max_steps=steps,
        warmup_steps=warmup_steps(steps),
        seed=SEED,
        trackers=[],
        progress_bar=False,
        log_every=10**9,
        eval_every=0,
        save_every=0,
        cpu=True,
        num_workers=0,
    )


def _evaluate(objective: Any, held_out: Any) -> dict[str, float]:
    """Held-out metrics with fixed crops, masks and distractors: one yardstick for both sides."""
    import torch

    from multissl.metrics import MetricSums
    from multissl.training.loader import make_loader

    loader, _ = make_loader(
        held_out,
        0,
        objective.eval_collator(),
        seed=SEED,
        shuffle=False,
        drop_last=False,
        rank=0,
        world_size=1,
        split_tag=1,
    )
    model = objective.model
    model.eval()
    sums = MetricSums()
    with torch.no_grad():
        for batch in loader:
            sums.add(objective.compute(model, batch))
    means = sums.reduce(None)
    return {k: means[k] for k in ("contrastive_accuracy", "codevector_perplexity", "contrastive_loss")}


@dataclass
class Tally:
    """What the batches a side trained on held, and what producing them cost."""

    stamps: list[float] = field(default_factory=list)
    """perf_counter at the end of every optimizer step."""
    produce_s: list[float] = field(default_factory=list)
    """Seconds spent producing each batch."""
    audio_s: list[float] = field(default_factory=list)
    utterances: list[int] = field(default_factory=list)
    padded: int = 0
    total: int = 0

    def batch(self, batch: Any, seconds: float) -> None:
        mask = batch["attention_mask"]
        real = int(mask.sum())
        self.produce_s.append(seconds)
        self.audio_s.append(real / RATE)
        self.utterances.append(int(mask.shape[0]))
        self.padded += int(mask.numel()) - real
        self.total += int(mask.numel())

    def summary(self) -> dict[str, float]:
        """Steady state: batches 2..N are produced and trained between the first and last stamp."""
        n = len(self.stamps)
        window = self.stamps[-1] - self.stamps[0]
        return {
            "steps": n,
            "audio_s_per_s": sum(self.audio_s[1:n]) / window,
            "collate_share": sum(self.produce_s[1:n]) / window,
            "padding": self.padded / max(1, self.total),
            "utterances_per_batch": statistics.fmean(self.utterances[:n]),
            "audio_s_per_batch": statistics.fmean(self.audio_s[:n]),
        }


def _timed(batches: Iterator[Any], tally: Tally) -> Iterator[Any]:
    """Pass batches through, timing how long each took to produce (in this process: num_workers=0)."""
    while True:
        start = time.perf_counter()
        batch = next(batches)
        tally.batch(batch, time.perf_counter() - start)
        yield batch


# ----------------------------------------------------------------------------- multissl side
def _train_multissl(objective: Any, train: Any, steps: int, tally: Tally) -> None:
    """Our recipe as users run it: the Trainer with the recipe's settings over our loader."""
    from multissl.training.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="bench_audio_") as out:
        trainer = Trainer(_recipe_trainer(out, steps))
        # Time batch production where the trainer pulls batches (sampler + row fetch + collation);
        # _micro_batches is private, wrapped here only because this is a benchmark.
        endless: Callable[..., Iterator[Any]] = trainer._micro_batches
        trainer._micro_batches = lambda loader, pos, state: _timed(endless(loader, pos, state), tally)
        anneal = objective.on_step_end

        def on_step_end(step: int) -> dict[str, float]:
            extra = anneal(step)  # Gumbel annealing belongs to the step
            tally.stamps.append(time.perf_counter())
            return extra

        objective.on_step_end = on_step_end
        trainer.fit(objective, train, None)
        objective.on_step_end = anneal


# ----------------------------------------------------------------------------- hf_example side
class HFExampleCollator:
    """The example's data path: each utterance decoded, cropped and normalised on its own by the
    feature extractor, the batch padded by ``feature_extractor.pad``, then numpy masks and
    distractors over the frames the attention mask leaves (the example's
    ``DataCollatorForWav2Vec2Pretraining``). The example crops in preprocessing (the first
    ``max_duration_in_seconds``); here decoding and a random-offset crop happen per batch, like ours."""

    def __init__(self, model: Any, max_samples: int) -> None:
        from transformers import Wav2Vec2FeatureExtractor

        self.model, self.max_samples = model, max_samples
        self.extractor = Wav2Vec2FeatureExtractor(
            feature_size=1,
            sampling_rate=RATE,
            padding_value=0.0,
            do_normalize=True,
            return_attention_mask=True,
        )

    def _utterance(self, path: str) -> Any:
        import numpy as np

        from multissl.data.audio import load_audio

        wave = load_audio(path, RATE)
        if len(wave) > self.max_samples:
            start = np.random.randint(0, len(wave) - self.max_samples + 1)
            wave = wave[start : start + self.max_samples]
        return {"input_values": self.extractor(wave, sampling_rate=RATE).input_values[0]}

    def __call__(self, rows: list[dict[str, Any]]) -> Any:
        import torch
        from transformers.models.wav2vec2.modeling_wav2vec2 import (
            _compute_mask_indices,
            _sample_negative_indices,
        )

        batch = self.extractor.pad(
            [self._utterance(r["path"]) for r in rows],
            padding="longest",
            return_attention_mask=True,
            return_tensors="pt",
        )
        shape = (
            batch["input_values"].shape[0],
            int(self.model._get_feat_extract_output_lengths(batch["input_values"].shape[-1])),
        )
        batch["sub_attention_mask"] = self.model._get_feature_vector_attention_mask(
            shape[1], batch["attention_mask"]
        )
        config = self.model.config
        mask = _compute_mask_indices(
            shape,
            config.mask_time_prob,
            config.mask_time_length,
            attention_mask=batch["sub_attention_mask"],
            min_masks=MIN_MASKS,
        )
        negatives = _sample_negative_indices(shape, config.num_negatives, mask_time_indices=mask)
        batch["mask_time_indices"] = torch.tensor(mask, dtype=torch.long)
        batch["sampled_negative_indices"] = torch.tensor(negatives, dtype=torch.long)
        return batch


def _epochs(loader: Any) -> Iterator[Any]:
    """Endless batches, epoch after epoch (the example loops over epochs until max_train_steps)."""
    while True:
        yield from loader


def _grad_norm(model: Any) -> float:
    """Global gradient norm the way the example monitors it: one host sync per parameter."""
    return math.sqrt(sum(p.grad.norm(2).item() ** 2 for p in model.parameters() if p.grad is not None))


def _train_hf_example(
    model: Any, train: Any, steps: int, batch_size: int, max_samples: int, loss: Any, tally: Tally,
    device: str = "cpu", bf16: bool = False,
) -> None:
    """The example's training loop, single process, no gradient accumulation. ``device`` and ``bf16``
    are what the example gets from Accelerate when launched on a GPU with ``--mixed_precision bf16``
    (the batch moved to the device, the forward under bf16 autocast); here: CPU, fp32."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    recipe = _recipe_trainer("unused", steps)  # same optimizer settings as our side
    model.to(device)  # before the optimizer is made, as Accelerate's prepare does
    rows = [{"path": p} for p in train.data["path"]]
    loader = DataLoader(
        rows,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=HFExampleCollator(model, max_samples),
        num_workers=0,
        generator=torch.Generator().manual_seed(SEED),
    )
    # The example passes no weight_decay: torch's AdamW default (0.01) on every parameter.
    optimizer = torch.optim.AdamW(
        list(model.parameters()), lr=recipe.lr, betas=recipe.adam_betas, eps=recipe.adam_eps
    )
    scheduler = get_scheduler(
        "linear", optimizer=optimizer, num_warmup_steps=warmup_steps(steps), num_training_steps=steps
    )
    model.train()
    batches = _timed(_epochs(loader), tally)
    for completed in range(steps):
        batch = next(batches)
        batch.pop("sub_attention_mask")
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        num_losses = batch["mask_time_indices"].sum()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            out = model(**batch)
        out.loss.backward()  # contrastive + diversity_weight * diversity, summed over masked frames
        for p in model.parameters():  # the example normalises the gradients, not the loss
            if p.grad is not None:
                p.grad.mul_(1 / num_losses)
        _grad_norm(model)  # the example computes it every step (for its log); kept for its cost
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        model.set_gumbel_temperature(max(loss.gumbel_start * loss.gumbel_decay**completed, loss.gumbel_end))
        tally.stamps.append(time.perf_counter())


# ----------------------------------------------------------------------------- one side
def run_side(side: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from accelerate.utils import set_seed

    from multissl.cli import quiet_libraries
    from multissl.data.audio_splits import prepare_audio
    from multissl.objectives.wav2vec2 import Wav2Vec2Pretraining, build_wav2vec2

    quiet_libraries()
    data_cfg, model_cfg, loss_cfg = _configs(args.max_seconds, args.max_batch_samples)
    train, held_out = prepare_audio(data_cfg, SEED)
    init = torch.load(args.init, weights_only=True)
    tally = Tally()
    set_seed(SEED)
    objective = Wav2Vec2Pretraining(model_cfg, loss_cfg, train.collator())
    objective.model.load_state_dict(init)
    if side == "multissl":
        _train_multissl(objective, train, args.steps, tally)
    else:
        # A plain model, as the example builds it: transformers' own class from the same config (not our
        # feature-encoder layout, `multissl.models.conv_features`, nor our objective's gradient-scale hook).
        from transformers import Wav2Vec2ForPreTraining

        config = build_wav2vec2(model_cfg, loss_cfg).config
        set_seed(SEED)  # then one model built, as before: the global stream (Gumbel noise) starts where it did
        model = Wav2Vec2ForPreTraining(config)
        model.load_state_dict(init)
        if any(type(m).__module__.startswith("multissl") for m in model.modules()):
            sys.exit("the example's side must run transformers' own modules only")
        _train_hf_example(model, train, args.steps, args.batch_size, data_cfg.max_samples, loss_cfg, tally)
        objective.model.load_state_dict(model.state_dict())
    result = {"side": side, **tally.summary(), **_evaluate(objective, held_out)}
    result["peak_rss_mb"] = peak_rss_mb()
    return result


# ----------------------------------------------------------------------------- driver
def prepare(work: Path, args: argparse.Namespace) -> tuple[str, int]:
    """Initial weights (saved once, loaded by both sides) and the HF side's batch size.

    Without ``--batch-size``, the HF batch holds about as much audio as our samples budget:
    ``round(max_batch_samples / mean cropped utterance length)``.
    """
    import numpy as np
    import torch

    from multissl.cli import quiet_libraries
    from multissl.data.audio_splits import prepare_audio
    from multissl.objectives.wav2vec2 import build_wav2vec2

    quiet_libraries()
    data_cfg, model_cfg, loss_cfg = _configs(args.max_seconds, args.max_batch_samples)
    train, held_out = prepare_audio(data_cfg, SEED)
    torch.manual_seed(SEED)
    init = work / "init.pt"
    torch.save(build_wav2vec2(model_cfg, loss_cfg).state_dict(), init)

    mean_len = float(np.mean(train.lengths))
    batch_size = args.batch_size or max(1, round(args.max_batch_samples / mean_len))
    sampler = train.make_batch_sampler(
        batch_size=0, seed=SEED, shuffle=True, drop_last=True, rank=0, world_size=1, split_tag=0
    )
    ours = sampler.global_batches()
    print(
        f"{len(train)} training / {len(held_out or [])} held-out utterances, mean cropped length "
        f"{mean_len / RATE:.2f} s; ours: budget {args.max_batch_samples} samples -> "
        f"{statistics.fmean(len(b) for b in ours):.2f} utterances, "
        f"{sum(int(train.lengths[b].sum()) for b in ours) / len(ours) / RATE:.2f} s of audio per batch (epoch 0); "
        f"hf_example: batch size {batch_size}"
        + ("" if args.batch_size else f" = round({args.max_batch_samples} / {mean_len:.0f})")
        + f" -> ~{batch_size * mean_len / RATE:.2f} s of audio per batch",
        flush=True,
    )
    return str(init), batch_size


ROWS: tuple[tuple[str, str, str], ...] = (
    ("audio_s_per_s", "audio-seconds/s", "{:.1f}"),
    ("padding", "padding fraction", "{:.3f}"),
    ("collate_share", "collation share of step time", "{:.3f}"),
    ("contrastive_accuracy", "held-out contrastive accuracy", "{:.4f}"),
    ("codevector_perplexity", "held-out codevector perplexity", "{:.1f}"),
    ("contrastive_loss", "held-out contrastive loss", "{:.4f}"),
    ("utterances_per_batch", "utterances/batch", "{:.2f}"),
    ("audio_s_per_batch", "audio seconds/batch", "{:.2f}"),
    ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=5.0, help="crop length (both sides)")
    parser.add_argument(
        "--max-batch-samples", type=int, default=400_000, help="ours: padded samples per batch"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="hf_example: utterances per batch (default: matches our budget's audio)",
    )
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (throughput is timed from the end of step 1)")

    if args.side:
        import torch

        torch.set_num_threads(args.threads)
        Path(args.out).write_text(json.dumps(run_side(args.side, args)), encoding="utf-8")
        return

    work = Path(tempfile.mkdtemp(prefix="bench_audio_"))
    init, batch_size = prepare(work, args)

    def child_args(side: str, rep: int, out: Path) -> list[str]:
        return [
            __file__,
            "--side",
            side,
            "--out",
            str(out),
            "--init",
            init,
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
            "--max-seconds",
            str(args.max_seconds),
            "--max-batch-samples",
            str(args.max_batch_samples),
            "--batch-size",
            str(batch_size),
        ]

    def report(side: str, rep: int, r: dict[str, Any]) -> str:
        return (
            f"{r['audio_s_per_s']:.1f} audio-s/s, padding {r['padding']:.3f}, collation {r['collate_share']:.3f}, "
            f"accuracy {r['contrastive_accuracy']:.4f}, perplexity {r['codevector_perplexity']:.1f}"
        )

    results = run_alternating(SIDES, args.repeats, work, args.threads, child_args, report)
    print(
        f"\n{args.steps} steps, crop {args.max_seconds} s, ours {args.max_batch_samples} samples/batch, "
        f"hf_example {batch_size} utterances/batch, {args.threads} threads, num_workers=0, "
        f"{args.repeats} repeats (median [min-max])\n"
    )
    print(median_table(results, SIDES, ROWS))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
