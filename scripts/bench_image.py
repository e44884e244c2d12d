"""Benchmark: multissl's image-SSL recipes vs their peers' own example loops, on CPU: SimCLR, BYOL and DINO
vs lightly's, MAE vs transformers' (``run_mae.py``; its sides, checks and table are in ``bench_mae.py``,
whose docstring lists what is the same and what differs for it; this one is about the lightly methods).

Our side (``multissl``) is the real recipe, ``recipes/<method>.py``'s ``main`` with ``key=value``
overrides, as users run it: its tiny preset, with the bench's step count, batch size and worker
count, the images below (``data.files``, ``data.validation_fraction=0``), probe off
(``probe.task=``), no evaluation, no trackers, no progress bar. The other side (``lightly``) is
lightly's plain-PyTorch example for the method (``examples/pytorch/{simclr,byol,dino}.py`` in
lightly's repository), written again here with the same structure: a model class with lightly's
heads (``SimCLRProjectionHead``; ``BYOLProjectionHead`` + ``BYOLPredictionHead``;
``DINOProjectionHead``), lightly's losses (``NTXentLoss``, ``NegativeCosineSimilarity``,
``DINOLoss``), ``update_momentum`` at the top of every iteration, lightly's transforms
(``SimCLRTransform``, ``BYOLTransform``, ``DINOTransform``) in a torch ``DataLoader`` over a
torchvision ``ImageFolder``, and a ``for batch in dataloader: ... loss.backward();
optimizer.step(); optimizer.zero_grad()`` loop.

The same on both sides (the lightly side reads every value from our recipe's resolved config):

* the images: the embedded digits' training split (4,005 MNIST PNGs), copied once into one folder
  in the imagefolder layout that both sides read; the held-out digits never reach either side;
* the backbone: timm's resnet18 at our tiny preset (``layers=[1,1,1,1]``,
  ``channels=[16,32,64,128]``, ``zero_init_last=False``, ``output_stride=8``, ``num_classes=0``:
  the preset's ``model.backbone.kwargs``), with identical initial weights. The recipe has
  no key to start from given backbone weights, so the bench builds them once after
  ``torch.manual_seed(0)`` and saves them (``init.pt``); our trainer seeds the same way before it
  builds its backbone, the lightly side loads ``init.pt``, and each child checks at its first
  optimizer step that every backbone weight matrix equals ``init.pt`` (it stops if not). The
  heads' initial weights are compared too (a hash of every trainable tensor) and reported;
* image size 32, the views' recipe (crop scale, no flip, colour jitter 0.8 at strength 0.5 =
  0.4/0.4/0.4/0.1, grayscale 0.2, ImageNet mean/std; BYOL/DINO: solarisation 0.2 on the second
  view, no blur; DINO: 2 global crops of 32 px at scale 0.4-1 + 4 local crops of 16 px at
  0.1-0.4), mapped onto lightly's transform parameters (the bench stops if a value cannot be);
* head widths (the tiny presets': SimCLR 128-256-64; BYOL projector 128-256-64 and predictor
  64-256-64; DINO 128-256-256-64 -> 1024 prototypes, batch norm after the hidden layers, weight-normalised
  last layer with unit norms);
* the losses' settings: NT-Xent temperature 0.5; DINO student temperature 0.1, teacher 0.04 (the
  preset holds it; lightly's linear warm-up is flat then), centre momentum 0.9, the student's last
  layer frozen for the first epoch;
* batch size, steps, the preset's optimizer (AdamW: lr, betas, eps; SGD: lr, momentum; weight
  decay on matrices only: lightly's ``get_weight_decay_parameters`` makes the same split,
  checked), the lr schedule (linear warm-up of 5% of the steps, then cosine to 0; lightly's
  ``cosine_warmup_schedule`` with ``max_steps = steps + 1`` is ours exactly), the EMA momentum (BYOL 0.99, DINO 0.996 -> 1 along a cosine, per step), DINO's
  weight decay 1e-4 -> 0.04 (cosine, per step) and gradient clipping at 3. Every schedule is
  checked equal step by step, and each child records the lr and weight decay it actually stepped
  with; the parent compares them;
* DataLoader workers (``--workers``), thread count (``torch.set_num_threads`` and
  ``OMP_NUM_THREADS``), CPU, fp32, one process per side per run.

What differs, and why:

* forward passes: lightly's examples put each view through the network on its own (SimCLR 2
  forwards; BYOL 2 online + 2 momentum; DINO 6 student + 2 teacher), so batch-norm statistics are
  per view; our objectives concatenate views (SimCLR/BYOL: one online + one target forward of both
  views; DINO: one student forward of the 2 global crops, one of the 4 local crops, one teacher
  forward). Same losses, other batch-norm batches: that is each library's design, measured as is;
* SimCLR's head: lightly's ``SimCLRProjectionHead`` has a batch norm on its output and no bias on
  its last linear layer; ours is Linear-BN-ReLU-Linear (the paper's v1 head). Same widths;
* BYOL's loss: ours is the paper's ``2 - 2 cos`` summed over both directions, lightly's example
  ``0.5 x (-cos - cos)``, whose gradient is 4 times smaller; lightly's side here scales its
  example's loss to ours (``4 + 2 x (-cos - cos)``), so SGD (the BYOL preset's optimizer, with
  momentum and coupled weight decay, as torch's ``SGD``) takes the same steps on both sides;
* DINO's teacher head: lightly's example builds it as a second, randomly initialised
  ``DINOProjectionHead`` (a weight-normalised module cannot be deep-copied); here the student
  head's weights are loaded into it, so the teacher starts as a copy of the student on both sides
  (ours, and the paper). DINO's crops: lightly's ``DINOTransform`` resizes crops bicubically and
  has no parameter for it; ours resize bilinearly (as lightly's SimCLR and BYOL transforms do).
  DINO's teacher temperature is passed to ``DINOLoss`` each step from lightly's
  ``linear_warmup_schedule`` (our formula) instead of its epoch-indexed warm-up;
* what our recipe adds to each step, kept since users run it: the global gradient norm (computed
  even with clipping off), the collapse diagnostics (std and an SVD of the batch's features), and
  metrics.jsonl every 25 steps; at the end a checkpoint and the exported model folder (counted in
  the wall time, not in steady-state samples/s). lightly's loop adds only what our settings need
  beyond its examples (AdamW groups, lr and weight-decay schedules, per-step momentum, DINO's
  clipping and frozen last layer);
* randomness: data order and augmentation draws come from other generators (ours: a seed per
  batch; lightly: the global torch, numpy and ``random`` generators, all seeded with the run's
  seed), so the runs see the same distributions, not the same pixels; each side repeats exactly. Our side decodes images in its collator; lightly's in ``ImageFolder``;
* the EMA: ours updates the target after each optimizer step (``torch._foreach_lerp_``), lightly's
  ``update_momentum`` before the next forward; the sequence of targets is the same.

Each side runs in its own process (so peak RSS is its own) with the same thread count; the sides
alternate over the repeats. Per side and method it reports: samples/s in steady state (a global
optimizer-step post-hook stamps the end of every step on both sides: ``(steps - 1) x batch`` over
the time from the end of step 1 to the end of the last); train wall time (start-up, data, training,
final save); peak RSS (the child's own ``VmHWM``, before evaluation); and the held-out kNN accuracy of the final backbone
(online for SimCLR/BYOL, teacher for DINO, as our objectives export) from ONE evaluator: pooled
features of the backbone in eval mode under timm's eval transform for 32-pixel inputs, on
``load_probe_data(ProbeConfig(task="digits"), "image")``, scored by ``multissl.probe.knn_probe``
(cosine, k=20, votes weighted exp(sim / 0.07)).

    python scripts/bench_image.py [--methods simclr,byol,dino,mae] [--steps 100] [--batch-size 128]
        [--repeats 3] [--threads 2] [--workers 0] [--out outputs/bench_image.json] [--smoke]

The JSON of every run goes to ``--out``, the printed tables beside it (the same name, ``.md``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import bench_mae
import torch
from benchlib import ROOT, fingerprint, median_table, run_alternating, timed_training
from torch import nn

SIDES = ("multissl", "lightly")
LIGHTLY_METHODS = ("simclr", "byol", "dino")
METHODS = (*LIGHTLY_METHODS, "mae")
CONFIG_CLASS = {"simclr": "SimCLRConfig", "byol": "BYOLConfig", "dino": "DINOConfig", "mae": "MAEConfig"}
KNN_K, EVAL_BATCH = 20, 256
# our view_transform's colour jitter: brightness, contrast, saturation 0.8 x strength, hue 0.2 x strength
JITTER = {"cj_bright": 0.8, "cj_contrast": 0.8, "cj_sat": 0.8, "cj_hue": 0.2}
ROWS: tuple[tuple[str, str, str], ...] = (
    ("samples_per_s", "samples/s (steady state)", "{:.1f}"),
    ("knn_acc", f"held-out kNN accuracy (k={KNN_K})", "{:.4f}"),
    ("train_s", "train wall time incl. start-up (s)", "{:.1f}"),
    ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"),
)


def _yaml_number(x: float) -> str:
    """A float that YAML reads back as a float (``3e-3`` would be a string to YAML 1.1)."""
    return f"{x:.12f}".rstrip("0")


# ----------------------------------------------------------------------------- shared evaluator
def evaluate(state_dict: dict[str, torch.Tensor], plan: dict[str, Any]) -> dict[str, float]:
    """kNN accuracy of a backbone's pooled features on the held-out digits (the same code for both sides)."""
    from multissl.models.backbones import BackboneConfig, build_backbone, eval_transform_of, set_preprocessing
    from multissl.models.features import image_features
    from multissl.probe import ProbeConfig, knn_probe, load_probe_data

    b, a = plan["cfg"]["model"]["backbone"], plan["cfg"]["augment"]
    net = build_backbone(BackboneConfig(name=b["name"], kwargs=b["kwargs"]))
    net.load_state_dict(state_dict)
    set_preprocessing(net, a["size"], tuple(a["mean"]), tuple(a["std"]))
    transform = eval_transform_of(net)
    net.eval()
    data = load_probe_data(ProbeConfig(task="digits"), "image")
    train_x = image_features(net, transform, data.train, EVAL_BATCH, pooled=True)
    eval_x = image_features(net, transform, data.eval, EVAL_BATCH, pooled=True)
    acc = knn_probe(train_x, torch.tensor(data.train_labels), eval_x, torch.tensor(data.eval_labels),
                    len(data.classnames), k=KNN_K)
    return {"knn_acc": acc, "knn_bank": len(data.train), "held_out": len(data.eval)}


# ----------------------------------------------------------------------------- our side
def _train_multissl(plan: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    """The recipe's ``main`` with the plan's overrides; returns the exported backbone's weights."""
    import importlib

    from safetensors.torch import load_file

    recipe = importlib.import_module(f"multissl_recipes.{plan['method']}")
    recipe.main([*plan["overrides"], f"trainer.output_dir={out}"])
    return load_file(str(out / "model" / "model.safetensors"))


# ----------------------------------------------------------------------------- lightly's side
class LightlySimCLR(nn.Module):
    """lightly's SimCLR example model: backbone + ``SimCLRProjectionHead``."""

    def __init__(self, backbone: nn.Module, in_dim: int, hidden: int, out: int) -> None:
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(in_dim, hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def online(self) -> list[nn.Module]:
        return [self.backbone, self.projection_head]

    def exported(self) -> nn.Module:
        return self.backbone


class LightlyBYOL(nn.Module):
    """lightly's BYOL example model: online backbone, projection and prediction heads, and momentum
    copies of the backbone and projection head."""

    def __init__(self, backbone: nn.Module, in_dim: int, proj: tuple[int, int], pred: tuple[int, int]) -> None:
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(in_dim, proj[0], proj[1])
        self.prediction_head = BYOLPredictionHead(proj[1], pred[0], pred[1])
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    def update_momentum(self, m: float) -> None:
        from lightly.models.utils import update_momentum

        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)

    def online(self) -> list[nn.Module]:
        return [self.backbone, self.projection_head, self.prediction_head]

    def exported(self) -> nn.Module:
        return self.backbone


class LightlyDINO(nn.Module):
    """lightly's DINO example model: student and teacher backbones with ``DINOProjectionHead``s. The
    teacher head gets the student head's initial weights (lightly's example leaves it random)."""

    def __init__(self, backbone: nn.Module, in_dim: int, hidden: int, bottleneck: int, out_dim: int,
                 freeze_last_layer: int, batch_norm: bool = False) -> None:
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.student_backbone = backbone
        self.student_head = DINOProjectionHead(in_dim, hidden, bottleneck, out_dim, batch_norm=batch_norm,
                                               freeze_last_layer=freeze_last_layer)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = DINOProjectionHead(in_dim, hidden, bottleneck, out_dim, batch_norm=batch_norm)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student_head(self.student_backbone(x).flatten(start_dim=1))

    def forward_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher_head(self.teacher_backbone(x).flatten(start_dim=1))

    def update_momentum(self, m: float) -> None:
        from lightly.models.utils import update_momentum

        update_momentum(self.student_backbone, self.teacher_backbone, m=m)
        update_momentum(self.student_head, self.teacher_head, m=m)

    def online(self) -> list[nn.Module]:
        return [self.student_backbone, self.student_head]

    def exported(self) -> nn.Module:
        return self.teacher_backbone  # as our DINO exports (and the paper evaluates) the teacher


def _jitter(a: dict[str, Any]) -> dict[str, Any]:
    """lightly's colour jitter, flip, grayscale and normalisation parameters for our view recipe ``a``."""
    return {"cj_prob": a["jitter"], "cj_strength": a["jitter_strength"], **JITTER, "random_gray_scale": a["grayscale"],
            "hf_prob": a["flip"], "vf_prob": 0.0, "rr_prob": 0.0,
            "normalize": {"mean": list(a["mean"]), "std": list(a["std"])}}


def lightly_transform(plan: dict[str, Any]) -> Any:
    """lightly's transform for the method, configured as our views (checked by `check_lightly_can_match`)."""
    from lightly.transforms import (
        BYOLTransform,
        BYOLView1Transform,
        BYOLView2Transform,
        DINOTransform,
        SimCLRTransform,
    )

    method, cfg = plan["method"], plan["cfg"]
    a, (v1, v2) = cfg["augment"], plan["views"]
    if method == "simclr":
        return SimCLRTransform(input_size=a["size"], min_scale=a["scale"][0], gaussian_blur=a["blur"], **_jitter(a))
    if method == "byol":
        return BYOLTransform(
            view_1_transform=BYOLView1Transform(input_size=a["size"], min_scale=a["scale"][0], gaussian_blur=v1["blur"],
                                                solarization_prob=v1["solarize"], **_jitter(a)),
            view_2_transform=BYOLView2Transform(input_size=a["size"], min_scale=a["scale"][0], gaussian_blur=v2["blur"],
                                                solarization_prob=v2["solarize"], **_jitter(a)))
    local = cfg["local"]
    return DINOTransform(global_crop_size=a["size"], global_crop_scale=tuple(a["scale"]),
                         local_crop_size=local["augment"]["size"], local_crop_scale=tuple(local["augment"]["scale"]),
                         n_local_views=local["count"], gaussian_blur=(v1["blur"], v2["blur"], local["augment"]["blur"]),
                         solarization_prob=v2["solarize"], **_jitter(a))


def _lightly_model(plan: dict[str, Any], backbone: nn.Module) -> nn.Module:
    m, width = plan["cfg"]["model"], int(backbone.num_features)
    if plan["method"] == "simclr":
        return LightlySimCLR(backbone, width, m["projector"]["hidden"][0], m["projector"]["out"])
    if plan["method"] == "byol":
        return LightlyBYOL(backbone, width, (m["projector"]["hidden"][0], m["projector"]["out"]),
                           (m["predictor"]["hidden"][0], m["predictor"]["out"]))
    h = m["head"]
    return LightlyDINO(backbone, width, h["hidden"], h["bottleneck"], h["out_dim"], int(m["freeze_last_layer_epochs"]),
                       h["batch_norm"])


def _lightly_criterion(plan: dict[str, Any]) -> nn.Module:
    from lightly.loss import DINOLoss, NegativeCosineSimilarity, NTXentLoss

    loss = plan["cfg"].get("loss", {})
    if plan["method"] == "simclr":
        return NTXentLoss(temperature=loss["temperature"])
    if plan["method"] == "byol":
        return NegativeCosineSimilarity()
    return DINOLoss(output_dim=plan["cfg"]["model"]["head"]["out_dim"], warmup_teacher_temp=loss["teacher_temperature"],
                    teacher_temp=loss["teacher_temperature_final"], student_temp=loss["student_temperature"],
                    center_momentum=loss["center_momentum"])


def seed_lightly_generators(seed: int) -> None:
    """Seed every generator lightly's example loop draws from: torch's (order, crops, jitter) and
    numpy's, which lightly's own solarisation and blur draw from (``np.random.random_sample``);
    left unseeded, BYOL's and DINO's views, and so their kNN accuracy, change from run to run."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _train_lightly(plan: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    """lightly's example loop for the method with our settings; returns the exported backbone's weights."""
    import timm
    import torchvision
    from lightly.models.utils import get_weight_decay_parameters
    from lightly.utils.scheduler import cosine_schedule, cosine_warmup_schedule, linear_warmup_schedule

    method, cfg = plan["method"], plan["cfg"]
    t, b = cfg["trainer"], cfg["model"]["backbone"]
    seed_lightly_generators(t["seed"])
    backbone = timm.create_model(b["name"], pretrained=False, num_classes=0, **b["kwargs"])
    backbone.load_state_dict(torch.load(plan["init"])["state_dict"])
    model = _lightly_model(plan, backbone)
    criterion = _lightly_criterion(plan)
    dataset = torchvision.datasets.ImageFolder(plan["train_dir"], transform=lightly_transform(plan))
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=plan["batch_size"], shuffle=True, drop_last=True,
                                             num_workers=plan["workers"])

    decay, no_decay = get_weight_decay_parameters(model.online())
    decay, no_decay = [p for p in decay if p.requires_grad], [p for p in no_decay if p.requires_grad]
    if any(p.ndim < 2 for p in decay) or any(p.ndim >= 2 for p in no_decay):
        sys.exit("lightly's weight-decay split differs from ours (matrices decayed, vectors not)")
    groups = [{"params": decay, "weight_decay": t["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if t["optimizer"] == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=t["lr"], momentum=t["momentum"],
                                                           nesterov=t["nesterov"])
    else:
        optimizer = torch.optim.AdamW(groups, lr=t["lr"], betas=tuple(t["adam_betas"]), eps=t["adam_eps"])
    params = decay + no_decay
    steps, warmup, per_epoch = plan["steps"], plan["warmup"], len(dataloader)
    momentum = cfg["model"].get("momentum")
    loss_cfg = cfg.get("loss", {})

    model.train()
    step = 0
    while step < steps:
        for views, _ in dataloader:
            if step == steps:
                break
            epoch = step // per_epoch
            lr = t["lr"] * cosine_warmup_schedule(step, steps + 1, 1.0, t["min_lr_ratio"], warmup, 0.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if t["weight_decay_end"] is not None:
                optimizer.param_groups[0]["weight_decay"] = cosine_schedule(step, steps, t["weight_decay"],
                                                                            t["weight_decay_end"])
            if momentum is not None:
                model.update_momentum(cosine_schedule(step, steps + 1, momentum["base"], momentum["final"]))
            if method == "simclr":
                x0, x1 = views
                z0, z1 = model(x0), model(x1)
                loss = criterion(z0, z1)
            elif method == "byol":
                x0, x1 = views
                p0, z0 = model(x0), model.forward_momentum(x0)
                p1, z1 = model(x1), model.forward_momentum(x1)
                # at our (the paper's) scale, 2 x (2 - 2 cos): the same gradients, which SGD needs
                loss = 4 + 2 * (criterion(p0, z1) + criterion(p1, z0))
            else:
                teacher_out = [model.forward_teacher(view) for view in views[:2]]
                student_out = [model(view) for view in views]
                temperature = linear_warmup_schedule(step, plan["teacher_temperature_warmup_steps"],
                                                     loss_cfg["teacher_temperature"],
                                                     loss_cfg["teacher_temperature_final"])
                loss = criterion(teacher_out, student_out, teacher_temp=temperature)
            loss.backward()
            if t["max_grad_norm"] > 0:
                torch.nn.utils.clip_grad_norm_(params, t["max_grad_norm"])
            if method == "dino":
                model.student_head.cancel_last_layer_gradients(current_epoch=epoch)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
    return {k: v.detach().clone() for k, v in model.exported().state_dict().items()}


# ----------------------------------------------------------------------------- one side
def run_side(side: str, args: argparse.Namespace) -> dict[str, Any]:
    plan = json.loads(Path(args.plan).read_text(encoding="utf-8"))
    init = torch.load(plan["init"])
    reference = [init["state_dict"][name] for name in init["matrices"]]
    lrs: list[float] = []
    wds: list[float] = []
    first: dict[str, Any] = {}

    def before_step(opt: torch.optim.Optimizer) -> None:
        groups = opt.param_groups  # ours: [matrices, vectors], as lightly's side builds them
        if not first:  # the initial weights, before any update
            mats = [p for g in groups for p in g["params"] if p.ndim >= 2]
            first["backbone_init_equal"] = len(mats) >= len(reference) and all(
                p.shape == r.shape and torch.equal(p.detach(), r) for p, r in zip(mats, reference))
            first["init_fingerprint"] = fingerprint([p for g in groups for p in g["params"]])
        lrs.append(float(groups[0]["lr"]))
        wds.append(float(groups[0]["weight_decay"]))

    out = Path(args.work) / f"{side}-{args.rep}"
    train = _train_multissl if side == "multissl" else _train_lightly
    weights, timing = timed_training(side, lambda: train(plan, out), before_step, plan["steps"], plan["batch_size"])
    if not first["backbone_init_equal"]:
        sys.exit(f"{side}: the backbone's initial weights differ from {plan['init']}")
    result = {
        "side": side,
        "method": plan["method"],
        **timing,
        "lr": lrs,
        "weight_decay": wds,
        **first,
        **evaluate(weights, plan),
    }
    shutil.rmtree(out, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------- the plan
def prepare_images(work: Path) -> tuple[Path, int]:
    """The digits' training split copied to ``work/train/<digit>/`` (both sides read it); checks that
    no held-out image (the evaluator's) is among them."""
    from multissl.data.image_data import ImageDataConfig
    from multissl.data.image_data import prepare_images as split_images
    from multissl.probe import ProbeConfig, load_probe_data

    train, _ = split_images(ImageDataConfig())
    folder = work / "train"
    for path in train.paths():
        src = Path(path)
        dst = folder / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    held_out = {Path(p).name for p in load_probe_data(ProbeConfig(task="digits"), "image").eval}
    if held_out & {Path(p).name for p in train.paths()}:
        sys.exit("the training split holds images the evaluator scores on")
    return folder, len(train)


def prepare_init(work: Path, backbone_cfg: Any, seed: int) -> Path:
    """The backbone's initial weights, built as our trainer builds them: right after seeding."""
    from multissl.models.backbones import build_backbone

    torch.manual_seed(seed)
    net = build_backbone(backbone_cfg)
    path = work / "init.pt"
    torch.save({"state_dict": net.state_dict(), "matrices": [n for n, p in net.named_parameters() if p.ndim >= 2]},
               path)
    return path


def check_lightly_can_match(method: str, cfg: Any) -> None:
    """Stop unless lightly's heads, transforms and loop can express our resolved config."""
    a, t = cfg.augment, cfg.trainer
    problems = []
    if t.optimizer not in ("adamw", "sgd") or t.lr_schedule != "cosine" or t.grad_accum_steps != 1:
        problems.append("the bench drives AdamW or SGD with a cosine schedule and no gradient accumulation")
    if a.scale[1] != 1.0 and method != "dino":
        problems.append(f"lightly's {method} transform crops up to the whole image (augment.scale max 1)")
    if method == "simclr" and (a.solarize or a.view(1) != a):
        problems.append("lightly's SimCLRTransform has no solarisation and one recipe for both views")
    if a.solarize:
        problems.append("lightly's first view is never solarised")
    if method in ("simclr", "byol"):
        heads = [cfg.model.projector] + ([cfg.model.predictor] if method == "byol" else [])
        if any(len(h.hidden) != 1 for h in heads):
            problems.append("lightly's SimCLR/BYOL heads have one hidden layer")
    if method == "dino":
        la = cfg.local.augment
        if cfg.model.head.layers != 3:
            problems.append("lightly's DINOProjectionHead has 3 layers")
        if not float(cfg.model.freeze_last_layer_epochs).is_integer():
            problems.append("lightly freezes the last layer for whole epochs")
        if a.jitter_strength != 0.5:
            problems.append("lightly's DINOTransform jitters its second global crop at strength 0.5 whatever cj_strength")
        if la.solarize or any(getattr(la, k) != getattr(a, k) for k in ("flip", "jitter", "jitter_strength",
                                                                        "grayscale", "mean", "std")):
            problems.append("lightly's local crops share the global crops' jitter, flip, grayscale and normalisation "
                            "and are never solarised")
        if cfg.loss.teacher_temperature > cfg.loss.teacher_temperature_final:
            problems.append("lightly's linear_warmup_schedule only rises")
    blurred = [a.blur, a.view(1).blur] + ([cfg.local.augment.blur] if method == "dino" else [])
    if any(blurred):
        print(f"warning: {method}: blur is on; ours blurs with a kernel of ~10% of the side (torchvision), lightly "
              "with PIL's GaussianBlur(radius=sigma)", flush=True)
    if problems:
        sys.exit(f"{method}: lightly's example cannot match our recipe: " + "; ".join(problems))


def check_schedules(plan: dict[str, Any], cfg: Any) -> float:
    """The largest difference, over every step, between our schedules and the lightly calls the loop makes."""
    from lightly.utils.scheduler import cosine_schedule, cosine_warmup_schedule, linear_warmup_schedule

    from multissl.losses.dino import teacher_temperature
    from multissl.models.ema import cosine_momentum
    from multissl.training.optim import weight_decay_at
    from multissl.training.schedules import lr_factor

    t, steps, warmup = cfg.trainer, plan["steps"], plan["warmup"]
    diffs = []
    for s in range(steps):
        ours = lr_factor(t.lr_schedule, s, warmup, steps, t.min_lr_ratio)
        diffs.append(abs(ours - cosine_warmup_schedule(s, steps + 1, 1.0, t.min_lr_ratio, warmup, 0.0)))
        if t.weight_decay_end is not None:
            diffs.append(abs(weight_decay_at(t, s, steps) - cosine_schedule(s, steps, t.weight_decay, t.weight_decay_end)))
        if plan["method"] != "simclr":  # ours after update s (1-based) == lightly's before update s (0-based)
            m = cfg.model.momentum
            diffs.append(abs(cosine_momentum(s, steps, m.base, m.final) - cosine_schedule(s, steps + 1, m.base, m.final)))
        if plan["method"] == "dino":
            c, w = cfg.loss, plan["teacher_temperature_warmup_steps"]
            diffs.append(abs(teacher_temperature(s, w, c.teacher_temperature, c.teacher_temperature_final)
                             - linear_warmup_schedule(s, w, c.teacher_temperature, c.teacher_temperature_final)))
    return max(diffs)


def recipe_overrides(method: str, args: argparse.Namespace, train_dir: Path) -> tuple[list[str], int]:
    """The overrides every method's recipe runs with here, and its warm-up steps (as the trainer derives them)."""
    import importlib

    from multissl import config as config_lib

    recipe = importlib.import_module(f"multissl_recipes.{method}")
    preset = config_lib.load(getattr(recipe, CONFIG_CLASS[method]), [], recipe.DEFAULT_CONFIG)
    warmup = preset.trainer.warmup_steps or int(preset.trainer.warmup_ratio * args.steps)
    overrides = [
        f"data.files={json.dumps([str(train_dir)])}",
        "data.validation_fraction=0",
        "probe.task=",
        f"trainer.seed={args.seed}",
        f"trainer.max_steps={args.steps}",
        f"trainer.batch_size={args.batch_size}",
        f"trainer.lr={_yaml_number(preset.trainer.lr)}",
        *([f"trainer.warmup_steps={warmup}"] if warmup else []),
        f"trainer.num_workers={args.workers}",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "trainer.progress_bar=false",
        "trainer.trackers=[]",
        "trainer.cpu=true",
    ]
    return overrides, warmup


def make_plan(method: str, args: argparse.Namespace, work: Path, train_dir: Path, n_train: int) -> tuple[dict[str, Any], Any]:
    """Our recipe's overrides and its resolved config (what the lightly side reads its settings from)."""
    import importlib

    from multissl import config as config_lib

    overrides, warmup = recipe_overrides(method, args, train_dir)
    if method == "mae":
        return bench_mae.make_plan(overrides, args, work, train_dir, n_train, warmup)
    recipe = importlib.import_module(f"multissl_recipes.{method}")
    cfg = config_lib.load(getattr(recipe, CONFIG_CLASS[method]), overrides, recipe.DEFAULT_CONFIG)
    check_lightly_can_match(method, cfg)
    plan: dict[str, Any] = {
        "method": method,
        "overrides": overrides,
        "cfg": config_lib.to_dict(cfg),
        "views": [config_lib.to_dict(cfg.augment.view(0)), config_lib.to_dict(cfg.augment.view(1))],
        "steps": args.steps,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "warmup": warmup,
        "steps_per_epoch": n_train // args.batch_size,
        "train_dir": str(train_dir),
        "init": str(work / "init.pt"),
    }
    if method == "dino":  # as DINO.setup derives it
        plan["teacher_temperature_warmup_steps"] = round(cfg.loss.teacher_temperature_warmup * args.steps)
    plan["schedule_max_diff"] = check_schedules(plan, cfg)
    if plan["schedule_max_diff"] > 1e-12:
        sys.exit(f"{method}: lightly's schedules differ from ours by {plan['schedule_max_diff']:.3g}")
    return plan, cfg


# ----------------------------------------------------------------------------- driver
def _max_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b)), default=math.nan) if len(a) == len(b) else math.inf


def cross_checks(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """What the two sides actually stepped with: lr and weight decay per step, and initial weights."""
    ours, theirs = runs[SIDES[0]], runs[SIDES[1]]
    return {
        "lr_max_diff": max(_max_diff(o["lr"], t["lr"]) for o in ours for t in theirs),
        "weight_decay_max_diff": max(_max_diff(o["weight_decay"], t["weight_decay"]) for o in ours for t in theirs),
        "backbone_init_equal": all(r["backbone_init_equal"] for side in SIDES for r in runs[side]),
        "init_tensors_equal": min(sum((Counter(o["init_fingerprint"]) & Counter(t["init_fingerprint"])).values())
                                  for o in ours for t in theirs),
        "init_tensors": (len(ours[0]["init_fingerprint"]), len(theirs[0]["init_fingerprint"])),
    }


def _medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key, _, _ in ROWS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {','.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers on both sides")
    parser.add_argument("--seed", type=int, default=0,
                        help="initial weights, data order and augmentations on both sides (run a few to see the kNN spread)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_image.json"), help="JSON of all runs")
    parser.add_argument("--smoke", action="store_true", help="2 steps, batch 16, 1 repeat: does it run end to end")
    parser.add_argument("--side", choices=sorted({*SIDES, *bench_mae.SIDES}), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--rep", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:
        import warnings

        torch.set_num_threads(args.threads)
        warnings.filterwarnings("ignore", message=".*weight_norm.*")  # lightly's DINO head uses the old API
        method = json.loads(Path(args.plan).read_text(encoding="utf-8"))["method"]
        result = bench_mae.run_side(args.side, args) if method == "mae" else run_side(args.side, args)
        Path(args.result).write_text(json.dumps(result), encoding="utf-8")
        return

    if args.smoke:
        args.steps, args.batch_size, args.repeats = 2, 16, 1
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        parser.error(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    if args.steps < 2:
        parser.error("--steps must be >= 2 (throughput is timed from the end of step 1)")
    if args.repeats < 1 or args.threads < 1 or args.workers < 0:
        parser.error("--repeats and --threads must be >= 1, --workers >= 0")

    from multissl.cli import quiet_libraries

    quiet_libraries()
    work = Path(tempfile.mkdtemp(prefix="bench_image_"))
    train_dir, n_train = prepare_images(work)
    if args.batch_size > n_train:
        sys.exit(f"--batch-size {args.batch_size} is larger than the {n_train} training images")
    plans = {m: make_plan(m, args, work, train_dir, n_train) for m in methods}
    lightly_plans = [(plan, cfg) for m, (plan, cfg) in plans.items() if m in LIGHTLY_METHODS]
    backbones = {json.dumps(plan["cfg"]["model"]["backbone"], sort_keys=True) for plan, _ in lightly_plans}
    if len(backbones) > 1:
        sys.exit(f"the methods' presets use different backbones: {backbones}")
    if lightly_plans:
        prepare_init(work, lightly_plans[0][1].model.backbone, args.seed)
    if "mae" in plans:
        bench_mae.prepare_init(*plans["mae"])
    print(f"{n_train} training images in {train_dir}; {args.steps} steps, batch {args.batch_size}, "
          f"{args.threads} threads, {args.workers} workers, {args.repeats} repeats, methods {', '.join(methods)}",
          flush=True)

    report: dict[str, Any] = {"settings": {k: getattr(args, k) for k in ("steps", "batch_size", "repeats", "threads", "seed",
                                                                          "workers")}, "methods": {}}
    tables = []
    for method, (plan, _) in plans.items():
        folder = work / method
        folder.mkdir()
        plan_path = folder / "plan.json"
        plan_path.write_text(json.dumps(plan), encoding="utf-8")

        def child_args(side: str, rep: int, result: Path, folder: Path = folder, plan_path: Path = plan_path) -> list[str]:
            return [str(Path(__file__).resolve()), "--side", side, "--result", str(result), "--plan", str(plan_path), "--work", str(folder),
                    "--rep", str(rep), "--threads", str(args.threads)]

        def progress(side: str, rep: int, r: dict[str, Any], method: str = method) -> str:
            return (f"{method}: {r['samples_per_s']:.1f} samples/s, kNN {r['knn_acc']:.4f}, "
                    f"{r['train_s']:.1f} s, {r['peak_rss_mb']:.0f} MB")

        if method == "mae":
            runs = run_alternating(bench_mae.SIDES, args.repeats, folder, args.threads, child_args, bench_mae.progress)
            checks = bench_mae.cross_checks(runs, plan)
            tables.append(bench_mae.table(plan, runs, checks))
            report["methods"][method] = {"plan": plan, "checks": checks, "runs": runs, "table": tables[-1],
                                         "medians": {side: bench_mae.medians(runs[side]) for side in bench_mae.SIDES}}
            continue
        runs = run_alternating(SIDES, args.repeats, folder, args.threads, child_args, progress)
        checks = cross_checks(runs)
        report["methods"][method] = {"plan": plan, "checks": checks, "runs": runs,
                                     "medians": {side: _medians(runs[side]) for side in SIDES}}
        first = runs[SIDES[0]][0]
        tables.append(
            f"\n### {method}: {args.steps} steps (warm-up {plan['warmup']}), batch {args.batch_size}, "
            f"lr {plan['cfg']['trainer']['lr']:g}, {plan['steps_per_epoch']} steps an epoch; kNN bank "
            f"{first['knn_bank']}, held-out {first['held_out']} digits\n"
            f"initial backbone weights identical on both sides: {'yes' if checks['backbone_init_equal'] else 'NO'}; "
            f"trainable tensors identical at step 1: {checks['init_tensors_equal']} (of {checks['init_tensors'][0]} "
            f"ours, {checks['init_tensors'][1]} lightly's); lr / weight decay stepped with, max difference: "
            f"{checks['lr_max_diff']:.3g} / {checks['weight_decay_max_diff']:.3g}\n\n"
            + median_table(runs, SIDES, ROWS, ratio_keys=("samples_per_s", "peak_rss_mb")))
        report["methods"][method]["table"] = tables[-1]
    text = (f"CPU, {args.threads} threads, {args.workers} DataLoader workers, fp32, seed {args.seed}, {args.repeats} repeat(s) "
            "(median [min-max]), sides alternated\n" + "\n".join(tables))
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    out.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
    print(f"\nall runs: {out}; tables: {out.with_suffix('.md')}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
