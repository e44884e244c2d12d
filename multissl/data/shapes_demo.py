"""Embedded image-text demo corpus: coloured shapes drawn with PIL, captioned from templates, offline.

The CLIP recipe needs image-caption pairs that every machine can make in seconds without a
download, and a zero-shot task that is meaningful on them. Each 64x64 RGB image shows one main
shape (one of `SHAPES` in one of `COLOURS`, so one of the classes in `CLASSNAMES`) of a random size
and position on a light background, sometimes with a smaller distractor of another class, plus a
little pixel noise. Every caption names the main shape's colour and shape, so the zero-shot prompt
``"a photo of a {classname}."`` (see `ZERO_SHOT_TEMPLATES`) points at the right image.

Determinism: image ``i`` depends only on ``(seed, i)`` (its own `random.Random` and numpy generator),
and classes are dealt in shuffled rounds of all classes, so a corpus of ``n`` images is a prefix of
the corpus of ``m > n`` images with the same seed, classes stay balanced (counts differ by at most
one), and the same ``(n, seed)`` gives byte-identical files (for one Pillow/zlib version).
"""

from __future__ import annotations

import io
import json
import random
import zlib
from pathlib import Path
from typing import Any

import numpy as np

CORPUS_VERSION = 1
DEFAULT_SIZE = 3000
IMAGE_SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 150, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 20),
    "purple": (135, 50, 170),
    "orange": (240, 125, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
#: Class names, sorted: the ids `prepare_image_text` gives to the corpus's labels (sorted distinct names).
CLASSNAMES: list[str] = sorted(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
ZERO_SHOT_TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "a {}.", "a picture of a {}.")
POSITIONS: dict[str, tuple[str, tuple[int, int]]] = {  # name -> (caption phrase, anchor centre in pixels)
    "left": ("on the left", (18, 32)),
    "right": ("on the right", (46, 32)),
    "top": ("at the top", (32, 18)),
    "bottom": ("at the bottom", (32, 46)),
    "centre": ("in the centre", (32, 32)),
}
RADIUS = {"small": (8, 10), "large": (13, 16)}  # half-extent of the main shape, in pixels
DISTRACTOR_RADIUS = (4, 5)  # clearly smaller than a small main shape
DISTRACTOR_PROB = 0.5
CAPTIONS_PER_IMAGE = 4
NOISE_STD = 4.0
_SUPERSAMPLE = 4  # drawn 4x larger, then box-downsampled: smooth edges without antialiasing support


# ------------------------------------------------------------------------------- drawing
def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else 0.45 * r
        angle = -np.pi / 2 + k * np.pi / 5
        points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
    return points


def _draw_shape(draw: Any, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    """One filled shape of half-extent ``r`` centred at ``(cx, cy)`` (supersampled pixels)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = 0.85 * r  # a square's corners reach further than a circle: keep their areas comparable
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif shape == "cross":
        t = 0.32 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _class_of(index: int, seed: int) -> str:
    """Classes dealt in shuffled rounds of all classes: balanced, and independent of ``n``."""
    rnd, pos = divmod(index, len(CLASSNAMES))
    order = random.Random(f"shapes-demo-classes:{seed}:{rnd}").sample(range(len(CLASSNAMES)), len(CLASSNAMES))
    return CLASSNAMES[order[pos]]


def _centre(rng: random.Random, position: str, r: int) -> tuple[int, int]:
    """The anchor of ``position`` jittered by a few pixels, kept so the whole shape is inside."""
    ax, ay = POSITIONS[position][1]
    lo, hi = r + 1, IMAGE_SIZE - 2 - r
    return min(max(ax + rng.randint(-3, 3), lo), hi), min(max(ay + rng.randint(-3, 3), lo), hi)


def _far_corner(rng: random.Random, cx: int, cy: int, r: int) -> tuple[int, int]:
    """The corner farthest from the main shape, so the distractor does not hide it."""
    m = r + 3
    corners = [(m, m), (IMAGE_SIZE - 1 - m, m), (m, IMAGE_SIZE - 1 - m), (IMAGE_SIZE - 1 - m, IMAGE_SIZE - 1 - m)]
    dist = [(x - cx) ** 2 + (y - cy) ** 2 for x, y in corners]
    best = [c for c, d in zip(corners, dist) if d == max(dist)]
    return rng.choice(best)


def _captions(rng: random.Random, size: str, label: str, position: str, distractor: str | None) -> list[str]:
    """A full description first (what eval uses), then a few shorter or differently worded ones."""
    where = POSITIONS[position][0]
    with_other = f" next to a small {distractor}" if distractor else ""
    first = f"a {size} {label} {where}"
    others = [
        f"a {label}",
        f"a photo of a {label}{with_other}",
        f"a {size} {label}",
        f"a drawing of a {label} {where}",
        f"a {label} {where}" + (f" and a small {distractor}" if distractor else ""),
        f"a {label} on a light background",
    ]
    return [first, *rng.sample(others, CAPTIONS_PER_IMAGE - 1)]


def draw_example(index: int, seed: int = 0) -> tuple[bytes, dict[str, object]]:
    """PNG bytes of image ``index`` and its metadata (``captions``, ``label``, ``size``, ``position``,
    ``distractor``), from ``(seed, index)`` alone."""
    from PIL import Image, ImageDraw

    rng = random.Random(f"shapes-demo-image:{seed}:{index}")
    label = _class_of(index, seed)
    colour, shape = label.split(" ")
    size = rng.choice(sorted(RADIUS))
    position = rng.choice(sorted(POSITIONS))
    r = rng.randint(*RADIUS[size])
    cx, cy = _centre(rng, position, r)
    distractor = rng.choice([c for c in CLASSNAMES if c != label]) if rng.random() < DISTRACTOR_PROB else None
    background = tuple(255 - rng.randint(5, 45) for _ in range(3))

    k = _SUPERSAMPLE
    canvas = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), background)
    draw = ImageDraw.Draw(canvas)
    if distractor:  # drawn first: the main shape stays whole if they touch
        d_colour, d_shape = distractor.split(" ")
        dr = rng.randint(*DISTRACTOR_RADIUS)
        dx, dy = _far_corner(rng, cx, cy, dr)
        _draw_shape(draw, d_shape, (dx + 0.5) * k, (dy + 0.5) * k, dr * k, COLOURS[d_colour])
    _draw_shape(draw, shape, (cx + 0.5) * k, (cy + 0.5) * k, r * k, COLOURS[colour])
    pixels = np.asarray(canvas.reduce(k), dtype=np.float32)
    noise = np.random.default_rng(zlib.crc32(f"shapes-demo-noise:{seed}:{index}".encode())).normal(0.0, NOISE_STD, pixels.shape)
    image = Image.fromarray(np.clip(np.round(pixels + noise), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    meta = {"captions": _captions(rng, size, label, position, distractor), "label": label, "size": size,
            "position": position, "distractor": distractor}
    return buf.getvalue(), meta


# ------------------------------------------------------------------------------- corpus files
def _params(n: int, seed: int) -> dict[str, int]:
    return {"version": CORPUS_VERSION, "n": n, "seed": seed}


def build_shapes_corpus(out_dir: str | Path, n: int, seed: int = 0) -> Path:
    """Write ``out_dir/images/000001.png ...`` and ``out_dir/metadata.jsonl`` (imagefolder layout,
    rows ``{"file_name", "captions", "label", ...}``) and ``corpus.json``; return the metadata path.

    The same ``(n, seed)`` gives byte-identical files.
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    (out / "corpus.json").unlink(missing_ok=True)  # the old corpus is no longer vouched for
    lines = []
    for i in range(n):
        png, meta = draw_example(i, seed)
        rel = f"images/{i + 1:06d}.png"
        (out / rel).write_bytes(png)
        lines.append(json.dumps({"file_name": rel, **meta}) + "\n")
    keep = {f"{i + 1:06d}.png" for i in range(n)}
    for stale in images.glob("*.png"):  # left by an earlier, larger build
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    metadata = out / "metadata.jsonl"
    metadata.write_text("".join(lines))
    (out / "corpus.json").write_text(json.dumps({"params": _params(n, seed)}, indent=2) + "\n")
    return metadata


def _is_built(folder: Path, params: dict[str, int]) -> bool:
    try:
        stored = json.loads((folder / "corpus.json").read_text())
    except (OSError, ValueError):
        return False
    return stored.get("params") == params and (folder / "metadata.jsonl").is_file()


def default_shapes_corpus() -> Path:
    """Build (once) the default 3000-image corpus in the cache and return its metadata path.

    The folder is ``$MULTISSL_CACHE/shapes-demo-v1`` or ``~/.cache/multissl/shapes-demo-v1``; it is
    built in a temporary sibling and renamed into place, so readers never see half a corpus.
    """
    from multissl.data.files import build_once, cache_root

    final = cache_root() / f"shapes-demo-v{CORPUS_VERSION}"
    params = _params(DEFAULT_SIZE, 0)
    build_once(final, lambda folder: _is_built(folder, params), lambda tmp: build_shapes_corpus(tmp, DEFAULT_SIZE, 0))
    return final / "metadata.jsonl"
