"""What each image-SSL recipe's tiny preset learns, with seeds, beside random init and raw pixels.

For every method and seed it trains the recipe's default (tiny) preset on the embedded digits'
training split (``trainer.seed=<seed>``), then probes the exported backbone with ``multissl
probe``'s own code on the digits probe task (2,000 train / 995 held-out images that pretraining
never saw): linear (L-BFGS) accuracy and cosine kNN accuracy at k=20 and k=200. Beside them:

* the same backbone at random init (one per seed), twice: with its batch-norm running statistics
  as initialised (0/1: what ``multissl probe --random-init`` measures), and re-estimated on
  training images. Neither is always the stronger (at init every image's eval-mode features point
  nearly the same way, yet the standardised linear probe reads 0.83 there against 0.71
  re-estimated), so a method must beat both;
* raw pixels (the classical baseline: 784 grey values per digit), with the same probes.

Runs already finished (their ``model/`` exists) are reused, so an interrupted report continues.

    python scripts/image_ssl_report.py [--methods simclr,byol] [--seeds 0,1,2] [--out outputs/image-ssl-report]
        [-- key=value ...]   # overrides for every training run, e.g. trainer.max_steps=100
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

METHODS = ("simclr", "moco", "byol", "simsiam", "barlow_twins", "vicreg", "dino", "rotation")
METRICS = ("linear_acc", "knn_acc", "knn200_acc")


def _summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


@torch.no_grad()
def reestimate_batch_norm(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 128) -> None:
    """Running statistics of every batch norm as the plain average over ``images`` (momentum None)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for start in range(0, len(images), batch_size):
        model(images[start:start + batch_size])
    model.eval()


def train_and_probe(method: str, seed: int, out: Path, overrides: list[str]) -> dict[str, Any]:
    from multissl.probe import ProbeConfig, probe_output

    run_dir = out / f"{method}_seed{seed}"
    started = time.perf_counter()
    if not (run_dir / "model" / "config.json").is_file():
        recipe = importlib.import_module(f"multissl_recipes.{method}")
        recipe.main([f"trainer.output_dir={run_dir}", f"trainer.seed={seed}", "trainer.progress_bar=false",
                     "trainer.trackers=[]", "trainer.resume=true", *overrides])
    result = probe_output(run_dir, ProbeConfig(task="digits"), device="cpu")
    return {"arm": method, "seed": seed, "train_s": round(time.perf_counter() - started, 1),
            **{k: result[k] for k in (*METRICS, "chance")}}


def random_init(seed: int) -> list[dict[str, Any]]:
    """The tiny preset's backbone (SimCLR's; every method's tiny preset shares it) at random init,
    probed with its batch-norm statistics as initialised and again with them re-estimated.

    The preset builds it with ``zero_init_last=False``: timm's default zero-initialises the last
    batch norm of every residual branch, which leaves an untrained ResNet the chain of strided 1x1
    shortcut convolutions, whose pooled feature at 32 px depends on a few corner pixels (measured: 2
    distinct feature vectors over 300 digits, probes at chance) - too weak a baseline to be fair."""
    from multissl_recipes.simclr import DEFAULT_CONFIG, SimCLRConfig

    from multissl import config
    from multissl.data.image_data import prepare_images
    from multissl.objectives.simclr import SimCLR
    from multissl.probe import ProbeConfig, load_probe_data, probe_encoder

    recipe = config.load(SimCLRConfig, [], DEFAULT_CONFIG)
    torch.manual_seed(seed)
    objective = SimCLR(recipe.model, recipe.loss, augment=recipe.augment)
    backbone = objective.export(objective.model)
    train, _ = prepare_images(recipe.data)
    probe_train = set(load_probe_data(ProbeConfig(task="digits"), "image").train)
    paths = [p for p in train.paths() if p not in probe_train][:2048]
    from PIL import Image

    images = torch.stack([objective.eval_tf(Image.open(p).convert("RGB")) for p in paths])
    cfg = ProbeConfig(task="digits")

    def probed(arm: str) -> dict[str, Any]:
        metrics, _ = probe_encoder(backbone, "image",
                                   lambda xs: objective.features(objective.model, xs, cfg.batch_size), cfg)
        return {"arm": arm, "seed": seed, **{k: metrics[k] for k in (*METRICS, "chance")}}

    as_initialised = probed("random init, BN as initialised")
    reestimate_batch_norm(backbone, images)
    return [as_initialised, probed("random init, BN re-estimated")]


def raw_pixels() -> dict[str, Any]:
    from PIL import Image

    from multissl.probe import ProbeConfig, load_probe_data, probe_features

    cfg = ProbeConfig(task="digits")
    data = load_probe_data(cfg, "image")

    def pixels(paths: tuple[str, ...]) -> torch.Tensor:
        return torch.tensor(np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float32).ravel() / 255
                                      for p in paths]))

    m = probe_features(pixels(data.train), torch.tensor(data.train_labels), pixels(data.eval),
                       torch.tensor(data.eval_labels), len(data.classnames), cfg)
    return {"arm": "raw pixels", "seed": 0, **{k: m[k] for k in (*METRICS, "chance")}}


def table(rows: list[dict[str, Any]]) -> str:
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    lines = ["| features | seeds | linear probe | kNN k=20 | kNN k=200 | train s (each) |", "|---|---|---|---|---|---|"]
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        cells = [_summary([r[k] for r in mine]) for k in METRICS]
        secs = [r["train_s"] for r in mine if "train_s" in r]
        lines.append(f"| {arm} | {len(mine)} | {' | '.join(cells)} | {statistics.fmean(secs):.0f} |" if secs
                     else f"| {arm} | {len(mine)} | {' | '.join(cells)} | - |")
    chance = rows[0]["chance"] if rows else float("nan")
    return "\n".join(lines) + f"\n\nmean ± standard deviation over seeds; chance (majority class) {chance:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="outputs/image-ssl-report")
    parser.add_argument("--no-baselines", action="store_true", help="skip random init and raw pixels")
    parser.add_argument("overrides", nargs="*", help="key=value for every training run (after --)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict[str, Any]] = []
    if not args.no_baselines:
        rows.append(raw_pixels())
        rows += [row for s in seeds for row in random_init(s)]
    for method in [m for m in args.methods.split(",") if m]:
        for seed in seeds:
            rows.append(train_and_probe(method, seed, out, args.overrides))
            print(json.dumps(rows[-1]), flush=True)
            (out / "report.json").write_text(json.dumps(rows, indent=1))
    (out / "report.json").write_text(json.dumps(rows, indent=1))
    (out / "report.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
