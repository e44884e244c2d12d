"""MAE in the image benchmark: multissl's MAE recipe vs the loop of transformers' own MAE example, on CPU.

``scripts/bench_image.py --methods mae`` runs it (this module holds its two sides, its checks and
its table; bench_image prepares the images and dispatches here).

Our side (``multissl``) is the real recipe, ``recipes/mae.py``'s ``main`` with ``key=value``
overrides: its tiny preset with the bench's step count, batch size and worker count, the bench's
images (``data.files``, ``data.validation_fraction=0``), probe off (``probe.task=``), no evaluation,
no trackers, no progress bar. The other side (``transformers``) is transformers' example
``examples/pytorch/image-pretraining/run_mae.py``, written again here with its structure: a
``ViTMAEConfig`` updated with the mask ratio and ``norm_pix_loss``, ``ViTMAEForPreTraining(config)``,
a ``ViTImageProcessor`` whose size, mean and std feed a torchvision ``Compose`` (RGB conversion,
``RandomResizedCrop``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``) applied to a
``datasets`` imagefolder with ``set_transform``, a ``collate_fn`` that stacks ``pixel_values``, the
example's absolute lr from a base lr (lr = base_lr x total batch / 256; the bench passes base = our
lr x 256 / batch), and ``Trainer(...).train()`` followed by ``save_model``, ``save_metrics`` and
``save_state``. The model draws its own mask noise inside ``forward``.

The same on both sides (the transformers side reads every value from our recipe's resolved config):

* the images: the embedded digits' training split (4,005 MNIST PNGs) in one imagefolder that both
  sides read; the held-out digits never reach either side;
* the model: ``ViTMAEForPreTraining`` of one ``ViTMAEConfig`` (the preset's ``model.config``,
  ``image_size = augment.size``, ``mask_ratio``, ``norm_pix_loss``), with identical initial weights.
  The recipe has no key to start from given weights, so the bench builds the model once after
  ``torch.manual_seed(0)`` and saves its state dict and config (``mae_init.pt``); our trainer seeds
  the same way before it builds its model; the transformers side builds its config from the plan,
  checks it equals the saved one and loads the saved state dict; each child checks at its first
  optimizer step that every trainable tensor equals the saved one (it stops if not);
* the training views: random resized crop to ``augment.size`` at ``augment.scale`` (bilinear, as
  ours), horizontal flip with probability ``augment.flip``, scaling to [0, 1], normalisation with
  ``augment.mean``/``augment.std`` (through the image processor on the transformers side); no colour
  jitter, grayscale, blur or solarisation (the bench stops if the preset asks for them);
* the loss: mean squared error on the hidden patches with per-patch normalised targets (the same
  formula: ours in ``multissl.losses.masked_pixels``, theirs inside ``ViTMAEForPreTraining``), 75%
  of the patches hidden;
* batch size, steps (dropping each epoch's last short batch, as ours does: ``dataloader_drop_last``),
  torch's fused AdamW (ours on CPU; ``TrainingArguments``' default, ``optim="adamw_torch_fused"``) with the preset's lr, betas (0.9, 0.95), eps
  and weight decay; weight decay on weight matrices and the patch projection only: biases and norms
  are exempt on both sides, and so are the class and mask tokens (ours exempts them as the paper's
  code does; the transformers side gets the same split by overriding ``Trainer``'s
  ``get_decay_parameter_names``, the hook its documentation names; the decayed sets are compared at
  the first step); no gradient clipping (the preset's ``max_grad_norm`` is 0; ``Trainer`` gets the
  same value); warm-up steps (ours: ``int(warmup_ratio x steps)``, handed to ``Trainer`` as
  ``warmup_steps``) then cosine to ``lr x min_lr_ratio``; each child records the lr and weight
  decay it stepped with, and the parent compares them;
* DataLoader workers (``--workers``; prefetch factor 4 when there are workers, ours), thread count
  (``torch.set_num_threads`` and ``OMP_NUM_THREADS``), CPU, fp32, one process per side per run.

What differs, and why:

* the warm-up's first step: transformers' cosine schedule starts its linear warm-up at 0 (update k
  takes ``k / W`` of the lr), ours at ``1 / W`` (update k takes ``(k + 1) / W``): during the W warm-up
  steps theirs runs one step behind ours (its first update moves no weight), afterwards both are
  the same cosine. Kept, as each library's schedule; checked and reported;
* where the mask noise comes from: ours draws it in the collator from the batch's seeded generator
  and hands it to the model (``noise=``), transformers' model draws it inside ``forward`` from the
  global generator. Data order and crops come from other generators too (ours: a seed per batch;
  theirs: ``Trainer``'s sampler and the global RNGs). Same distributions, not the same pixels or
  masks; the held-out loss below uses one fixed noise for both;
* decoding and views: ours decodes each batch's PNG files in its collator, crops with PIL directly
  (``multissl.data.crops``: the same box rule and pixels as torchvision's, without its per-call
  overhead) and converts and normalises the stacked batch once; theirs decodes through ``datasets``'
  ``Image`` feature and runs the torchvision ``Compose`` image by image, after ``load_dataset("imagefolder")`` builds its Arrow cache (a fresh cache
  folder per run, so every run pays it, counted in the wall time, not in steady-state samples/s);
* the attention kernel: ours is the preset's ``model.attn_implementation`` (the tiny preset's
  plain matmul-softmax path, faster on CPU at 17 visible and 65 decoder tokens than torch's CPU
  flash kernel), theirs the model's default (SDPA), as the example leaves it; the same arithmetic
  (a test holds loss and gradients equal). ``model.attn_implementation=sdpa`` on our side gives the
  kernel-for-kernel comparison;
* what each loop adds to a step: ours computes the global gradient norm (even with clipping off),
  counts samples and checks for a stop signal; ``Trainer`` runs its callbacks and NaN filter. Both log
  every ``log_every`` steps (ours to metrics.jsonl, theirs to its state and, with tqdm off, stdout). At the end ours writes a
  checkpoint (model and optimizer state) and exports the encoder as a ``ViTModel`` with its image
  processor and a model card; theirs saves the whole model with its image processor and its state
  (``save_strategy="no"``: no optimizer state). Counted in the wall time only;
* where the bench departs from the example to match ours: the example's ``Compose`` hard-codes
  bicubic crops, a flip probability of 0.5 and crop scale 0.2-1 (here: ours, bilinear, the preset's
  flip and scale); its ``Trainer``
  decays the class and mask tokens (here not, as ours); it sets the warm-up as a ratio (rounded up
  by ``Trainer``; here the step count ours derives, rounded down).

Per side it reports: samples/s in steady state (a global optimizer-step post-hook stamps the end of
every step on both sides: ``(steps - 1) x batch`` over the time from the end of step 1 to the end of
the last); train wall time (start-up, data, training, final save); peak RSS (the child's own
``VmHWM``, before evaluation); and the held-out reconstruction loss of the final weights from ONE evaluator: each side's final
``ViTMAEForPreTraining`` weights loaded into a fresh model of the saved config, in eval mode, on
the held-out digits (``load_probe_data(ProbeConfig(task="digits"), "image")``, resized whole to
``augment.size`` and normalised, as our recipe evaluates), with one mask noise tensor drawn from
``torch.Generator().manual_seed(0)``: the model's own masked-pixel loss, averaged over the images.
The same evaluator scores the initial weights once, for reference.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from benchlib import fingerprint, median_table, timed_training

SIDES = ("multissl", "transformers")
SEED, EVAL_BATCH = 0, 256
TOKENS = ("cls_token", "mask_token")  # not decayed by our MAE (nor by the paper's code)
ROWS: tuple[tuple[str, str, str], ...] = (
    ("samples_per_s", "samples/s (steady state)", "{:.1f}"),
    ("recon_loss", "held-out masked-pixel loss (fixed mask noise)", "{:.4f}"),
    ("train_s", "train wall time incl. start-up (s)", "{:.1f}"),
    ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"),
)


# ----------------------------------------------------------------------------- shared evaluator
def held_out_batches(size: int, mean: list[float], std: list[float]) -> list[torch.Tensor]:
    """The held-out digits as normalised tensors, resized whole to ``size`` (our recipe's eval transform)."""
    from PIL import Image

    from multissl.objectives.mae import eval_transform
    from multissl.probe import ProbeConfig, load_probe_data

    transform = eval_transform(size, tuple(mean), tuple(std))
    paths = list(load_probe_data(ProbeConfig(task="digits"), "image").eval)
    pixels = []
    for path in paths:
        with Image.open(path) as img:
            pixels.append(transform(img.convert("RGB")))
    stacked = torch.stack(pixels)
    return list(stacked.split(EVAL_BATCH))


@torch.no_grad()
def reconstruction_loss(state_dict: dict[str, torch.Tensor], init_path: str, plan: dict[str, Any]) -> dict[str, float]:
    """The masked-pixel loss of ``state_dict`` (a whole ``ViTMAEForPreTraining``) on the held-out digits,
    with the same mask noise for every model scored (the same code for both sides)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    init = torch.load(init_path)
    model = ViTMAEForPreTraining(ViTMAEConfig.from_dict(init["config"]))
    model.load_state_dict(state_dict)
    model.eval()
    a = plan["cfg"]["augment"]
    batches = held_out_batches(a["size"], a["mean"], a["std"])
    n = sum(len(b) for b in batches)
    noise = torch.rand((n, model.vit.embeddings.patch_embeddings.num_patches),
                       generator=torch.Generator().manual_seed(SEED))
    total, start = 0.0, 0
    for pixels in batches:  # every image hides the same number of patches: the mean of images is exact
        out = model(pixel_values=pixels, noise=noise[start:start + len(pixels)])
        total += float(out.loss) * len(pixels)
        start += len(pixels)
    return {"recon_loss": total / n, "held_out": n}


# ----------------------------------------------------------------------------- our side
def _train_multissl(plan: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    """The recipe's ``main`` with the plan's overrides; returns the final ``ViTMAEForPreTraining`` weights
    (the exported folder holds only the encoder, so they are taken from the fit's result)."""
    from multissl_recipes import mae

    result = mae.main([*plan["overrides"], f"trainer.output_dir={out}"])
    if result.model is None or result.state.step != plan["steps"]:
        sys.exit(f"multissl: the fit returned no model at step {plan['steps']}")
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


# ----------------------------------------------------------------------------- transformers' side
def _train_transformers(plan: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    """transformers' MAE example (``run_mae.py``) with our settings; returns the final model's weights."""
    from datasets import load_dataset
    from torchvision.transforms import (
        Compose,
        InterpolationMode,
        Lambda,
        Normalize,
        RandomHorizontalFlip,
        RandomResizedCrop,
        ToTensor,
    )
    from transformers import Trainer, TrainingArguments, ViTImageProcessor, ViTMAEConfig, ViTMAEForPreTraining

    cfg = plan["cfg"]
    t, a, loss = cfg["trainer"], cfg["augment"], cfg["loss"]

    class DecaySplitTrainer(Trainer):
        """``Trainer`` with the class and mask tokens exempt from weight decay, as ours."""

        def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
            return [n for n in super().get_decay_parameter_names(model) if not n.endswith(TOKENS)]

    def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}

    init = torch.load(plan["init"])
    config = ViTMAEConfig(**cfg["model"]["config"], image_size=a["size"])
    config.update({"mask_ratio": loss["mask_ratio"], "norm_pix_loss": loss["norm_pix"]})
    if _config_dict(config) != _config_dict(ViTMAEConfig.from_dict(init["config"])):
        sys.exit("transformers: the ViTMAEConfig built from the plan differs from the initial model's")
    processor = ViTImageProcessor(size={"height": a["size"], "width": a["size"]}, image_mean=list(a["mean"]),
                                  image_std=list(a["std"]))
    model = ViTMAEForPreTraining(config)
    model.load_state_dict(init["state_dict"])

    ds = load_dataset("imagefolder", data_dir=plan["train_dir"], cache_dir=str(out / "datasets_cache"))
    size = (processor.size["height"], processor.size["width"])
    transforms = Compose([
        Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
        RandomResizedCrop(size, scale=tuple(a["scale"]), interpolation=InterpolationMode.BILINEAR),
        RandomHorizontalFlip(a["flip"]),
        ToTensor(),
        Normalize(mean=processor.image_mean, std=processor.image_std),
    ])

    def preprocess_images(examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        examples["pixel_values"] = [transforms(image) for image in examples["image"]]
        return examples

    ds["train"].set_transform(preprocess_images)

    schedule = ({"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": t["min_lr_ratio"]}}
                if t["min_lr_ratio"] > 0 else {"lr_scheduler_type": "cosine"})
    workers = {"dataloader_prefetch_factor": 4} if plan["workers"] > 0 else {}
    base_learning_rate = t["lr"] * 256 / plan["batch_size"]  # the example's argument (its lr = base x batch / 256)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=plan["batch_size"], max_steps=plan["steps"], warmup_steps=plan["warmup"],
        weight_decay=t["weight_decay"], adam_beta1=t["adam_betas"][0], adam_beta2=t["adam_betas"][1],
        adam_epsilon=t["adam_eps"], optim="adamw_torch_fused", max_grad_norm=t["max_grad_norm"], **schedule,
        dataloader_num_workers=plan["workers"], dataloader_drop_last=True, remove_unused_columns=False,
        logging_steps=t["log_every"], save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=True, seed=t["seed"], **workers)
    total_train_batch_size = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
    args.learning_rate = base_learning_rate * total_train_batch_size / 256

    trainer = DecaySplitTrainer(model=model, args=args, train_dataset=ds["train"], processing_class=processor,
                                data_collator=collate_fn)
    train_result = trainer.train()
    trainer.save_model()
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _config_dict(config: Any) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}


# ----------------------------------------------------------------------------- one side
def run_side(side: str, args: argparse.Namespace) -> dict[str, Any]:
    plan = json.loads(Path(args.plan).read_text(encoding="utf-8"))
    init = torch.load(plan["init"])
    reference = Counter(fingerprint([init["state_dict"][n] for n in init["trainable"]]))
    lrs: list[float] = []
    wds: list[float] = []
    first: dict[str, Any] = {}

    def before_step(opt: torch.optim.Optimizer) -> None:
        groups = opt.param_groups
        if not first:  # the initial weights and the decay split, before any update
            stepped = fingerprint([p for g in groups for p in g["params"]])
            first["init_equal"] = Counter(stepped) == reference
            first["init_tensors"] = len(stepped)
            first["decayed"] = fingerprint([p for g in groups if g["weight_decay"] > 0 for p in g["params"]])
        lrs.append(max(float(g["lr"]) for g in groups))
        wds.append(max(float(g["weight_decay"]) for g in groups))

    out = Path(args.work) / f"{side}-{args.rep}"
    train = _train_multissl if side == "multissl" else _train_transformers
    weights, timing = timed_training(side, lambda: train(plan, out), before_step, plan["steps"], plan["batch_size"])
    if not first["init_equal"]:
        sys.exit(f"{side}: the model's initial trainable weights differ from {plan['init']}")
    result = {
        "side": side,
        "method": plan["method"],
        **timing,
        "lr": lrs,
        "weight_decay": wds,
        **first,
        **reconstruction_loss(weights, plan["init"], plan),
    }
    shutil.rmtree(out, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------- the plan
def check_transformers_can_match(cfg: Any) -> None:
    """Stop unless the example's transform, ``TrainingArguments`` and loop can express our resolved config."""
    a, t = cfg.augment, cfg.trainer
    problems = []
    if t.optimizer != "adamw" or t.lr_schedule != "cosine" or t.grad_accum_steps != 1:
        problems.append("the bench drives AdamW with a cosine schedule and no gradient accumulation")
    if t.weight_decay_end is not None:
        problems.append("TrainingArguments has no weight-decay schedule")
    if t.mixed_precision != "no":
        problems.append("the bench runs fp32")
    if any(getattr(a, k) for k in ("jitter", "grayscale", "blur", "solarize")):
        problems.append("the example's transform is crop + flip only (no jitter, grayscale, blur, solarisation)")
    if problems:
        sys.exit("mae: transformers' example cannot match our recipe: " + "; ".join(problems))


def schedules(cfg: Any, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """The lr of every update, ours and transformers' (its scheduler on a throwaway optimizer)."""
    from transformers import get_scheduler

    from multissl.training.schedules import lr_factor

    t = cfg.trainer
    ours = [t.lr * lr_factor(t.lr_schedule, s, warmup, steps, t.min_lr_ratio) for s in range(steps)]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
    kind, kwargs = ("cosine_with_min_lr", {"min_lr_rate": t.min_lr_ratio}) if t.min_lr_ratio > 0 else ("cosine", {})
    sched = get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=steps, scheduler_specific_kwargs=kwargs)
    theirs = []
    for _ in range(steps):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return ours, theirs


def compare_lr(ours: list[float], theirs: list[float], warmup: int) -> dict[str, float]:
    """Max |difference| after the warm-up, and during it against ours one step earlier (0 before step 1)."""
    def gap(xs: list[float], ys: list[float]) -> float:
        return max((abs(x - y) for x, y in zip(xs, ys)), default=0.0) if len(xs) == len(ys) else math.inf

    return {"after_warmup": gap(ours[warmup:], theirs[warmup:]),
            "warmup_vs_ours_one_step_earlier": gap([0.0, *ours[:warmup - 1]] if warmup else [], theirs[:warmup])}


def make_plan(overrides: list[str], args: argparse.Namespace, work: Path, train_dir: Path, n_train: int,
              warmup: int) -> tuple[dict[str, Any], Any]:
    """Our recipe's resolved config under the bench's overrides (what the transformers side reads)."""
    from multissl_recipes import mae

    from multissl import config as config_lib

    cfg = config_lib.load(mae.MAEConfig, overrides, mae.DEFAULT_CONFIG)
    check_transformers_can_match(cfg)
    plan: dict[str, Any] = {
        "method": "mae",
        "overrides": overrides,
        "cfg": config_lib.to_dict(cfg),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "warmup": warmup,
        "steps_per_epoch": n_train // args.batch_size,
        "train_dir": str(train_dir),
        "init": str(work / "mae_init.pt"),
    }
    ours, theirs = schedules(cfg, args.steps, warmup)
    plan["schedule_check"] = compare_lr(ours, theirs, warmup)
    if max(plan["schedule_check"].values()) > 1e-12 * cfg.trainer.lr:
        sys.exit(f"mae: transformers' schedule differs from ours beyond the warm-up shift: {plan['schedule_check']}")
    return plan, cfg


def prepare_init(plan: dict[str, Any], cfg: Any) -> None:
    """The model's initial weights and config, built as our trainer builds them: right after seeding;
    and their held-out loss (the reference both sides start from)."""
    from multissl.objectives.mae import build_mae

    torch.manual_seed(cfg.trainer.seed)
    model = build_mae(cfg.model, cfg.loss, cfg.augment.size)
    state = model.state_dict()
    torch.save({"state_dict": state, "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
                "config": model.config.to_dict()}, plan["init"])
    plan["init_loss"] = reconstruction_loss(state, plan["init"], plan)["recon_loss"]


# ----------------------------------------------------------------------------- report
def progress(side: str, rep: int, r: dict[str, Any]) -> str:
    return (f"mae: {r['samples_per_s']:.1f} samples/s, held-out loss {r['recon_loss']:.4f}, "
            f"{r['train_s']:.1f} s, {r['peak_rss_mb']:.0f} MB")


def cross_checks(runs: dict[str, list[dict[str, Any]]], plan: dict[str, Any]) -> dict[str, Any]:
    """What the two sides actually stepped with: lr and weight decay per step, initial weights, decay split."""
    ours, theirs = runs[SIDES[0]], runs[SIDES[1]]
    lr = [compare_lr(o["lr"], t["lr"], plan["warmup"]) for o in ours for t in theirs]
    wd = [max((abs(x - y) for x, y in zip(o["weight_decay"], t["weight_decay"])), default=0.0)
          for o in ours for t in theirs]
    return {
        "lr_after_warmup_max_diff": max(c["after_warmup"] for c in lr),
        "lr_warmup_shift_max_diff": max(c["warmup_vs_ours_one_step_earlier"] for c in lr),
        "weight_decay_max_diff": max(wd),
        "init_equal": all(r["init_equal"] for side in SIDES for r in runs[side]),
        "init_tensors": (ours[0]["init_tensors"], theirs[0]["init_tensors"]),
        "decay_split_equal": all(o["decayed"] == t["decayed"] for o in ours for t in theirs),
        "decayed_tensors": (len(ours[0]["decayed"]), len(theirs[0]["decayed"])),
    }


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key, _, _ in ROWS}


def table(plan: dict[str, Any], runs: dict[str, list[dict[str, Any]]], checks: dict[str, Any]) -> str:
    t, m = plan["cfg"]["trainer"], plan["cfg"]["model"]["config"]
    first = runs[SIDES[0]][0]
    yes = {True: "yes", False: "NO"}
    return (
        f"\n### mae: {plan['steps']} steps (warm-up {plan['warmup']}), batch {plan['batch_size']}, lr {t['lr']:g}, "
        f"{plan['steps_per_epoch']} steps an epoch; ViT {m.get('num_hidden_layers')}x{m.get('hidden_size')} patch "
        f"{m.get('patch_size')} at {plan['cfg']['augment']['size']} px; held-out {first['held_out']} digits, "
        f"loss of the initial weights {plan['init_loss']:.4f}\n"
        f"initial weights identical on both sides: {yes[checks['init_equal']]} ({checks['init_tensors'][0]} / "
        f"{checks['init_tensors'][1]} trainable tensors); decayed tensors identical: {yes[checks['decay_split_equal']]} "
        f"({checks['decayed_tensors'][0]} / {checks['decayed_tensors'][1]}); lr stepped with, max difference after "
        f"warm-up: {checks['lr_after_warmup_max_diff']:.3g} (during warm-up transformers' = ours one step earlier, "
        f"max difference {checks['lr_warmup_shift_max_diff']:.3g}); weight decay: {checks['weight_decay_max_diff']:.3g}\n\n"
        + median_table(runs, SIDES, ROWS, ratio_keys=("samples_per_s", "peak_rss_mb")))
