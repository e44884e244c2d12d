"""Figures for model cards and reports, drawn with matplotlib's file backend (no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from multissl.metrics import read_jsonl


def loss_curve(metrics_path: Path, out: Path) -> Path | None:
    """Training and held-out loss against optimizer steps, from a run's ``metrics.jsonl``; None when
    there is nothing to draw (no logged loss)."""
    if not metrics_path.is_file():
        return None
    rows = read_jsonl(metrics_path)
    series = {
        "training": [(r["step"], r["train/loss"]) for r in rows if isinstance(r.get("train/loss"), (int, float))],
        "held-out": [(r["step"], r["eval/loss"]) for r in rows if isinstance(r.get("eval/loss"), (int, float))],
    }
    if not any(series.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for (label, points), style in zip(series.items(), ("-", "o-")):
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, style, label=label, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    return _finish(fig, ax, out)


def lift_plot(points: dict[str, list[tuple[float, float, float]]], metric: str, title: str, out: Path,
              dashed: Sequence[str] = ()) -> Path:
    """One curve per starting point (pretrained, from scratch) and, dashed, per series named in
    ``dashed`` (a classical baseline: no fine-tuning): ``metric`` against the labelled fraction (log
    scale), as ``(fraction, mean, spread)`` points; a spread (std over seeds) is drawn as error bars,
    none with one seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    markers = iter("os^Dv")
    for label, series in points.items():
        xs, ys, errs = zip(*sorted(series))
        style = next(markers, "o") + ("--" if label in dashed else "-")
        ax.errorbar(xs, ys, yerr=errs if any(errs) else None, fmt=style, label=label, capsize=3, markersize=5)
    ax.set_xscale("log")
    xs_all = sorted({x for series in points.values() for x, _, _ in series})
    ax.set_xticks(xs_all, [f"{x:.0%}" if x >= 0.01 else f"{x:.1%}" for x in xs_all])
    ax.minorticks_off()
    ax.set_xlabel("share of the training labels used")
    ax.set_ylabel(f"held-out {metric}")
    ax.set_title(title)
    return _finish(fig, ax, out)


def _finish(fig: Any, ax: Any, out: Path) -> Path:
    """Grid, legend, tight layout, written as PNG; the figure is closed (pyplot keeps every open one)."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


def image_grid(rows: list[list[Any]], out: Path, cell: int = 96, gap: int = 2) -> Path:
    """A grid of (3, H, W) tensors in [0, 1], one row per list, each cell enlarged to ``cell`` pixels
    (nearest neighbour: small images stay crisp); written as PNG."""
    from PIL import Image

    width = max(len(r) for r in rows)
    canvas = Image.new("RGB", (width * (cell + gap) + gap, len(rows) * (cell + gap) + gap), "white")
    for i, row in enumerate(rows):
        for j, tensor in enumerate(row):
            pixels = (tensor.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
            tile = Image.fromarray(pixels).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (gap + j * (cell + gap), gap + i * (cell + gap)))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
