"""The PIL crop and flip that replace torchvision's in every image view: same box rule, same pixels."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from multissl.data.crops import RandomHorizontalFlip, RandomResizedCrop, crop_box
from multissl.data.images import seeded_rngs


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(("width", "height", "scale"), [(28, 28, (0.08, 1.0)), (64, 40, (0.3, 1.0)), (60, 90, (0.3, 0.9))])
def test_crop_boxes_keep_the_area_share_and_aspect_bounds(width: int, height: int, scale: tuple[float, float]) -> None:
    rng = random.Random(0)
    shares, aspects = [], []
    for _ in range(2000):
        left, top, w, h = crop_box(width, height, scale, rng=rng)
        assert left >= 0 and left + w <= width and top >= 0 and top + h <= height and w > 0 and h > 0
        shares.append(w * h / (width * height))
        aspects.append(math.log(w / h))
    slack = 2.5 / min(width, height)  # rounding w and h to whole pixels
    assert min(shares) >= scale[0] - 2 * slack and max(shares) <= scale[1] + 2 * slack
    assert max(abs(a) for a in aspects) <= math.log(4 / 3) + 2 * slack
    assert np.std(shares) > 0.02, "the crops vary"


def test_an_impossible_crop_falls_back_to_the_centre_at_the_nearest_aspect() -> None:
    # a 100 x 10 strip: no crop with aspect in [3/4, 4/3] covers half of it; the centre 13 x 10 is taken (and 10 x 13 of a tall one)
    assert crop_box(100, 10, (0.5, 1.0)) == ((100 - 13) // 2, 0, 13, 10)
    assert crop_box(10, 100, (0.5, 1.0)) == (0, (100 - 13) // 2, 10, 13)


@pytest.mark.parametrize("size", [16, (12, 20)])
def test_the_crop_has_torchvisions_pixels_for_its_box(size: int | tuple[int, int]) -> None:
    img = _image(40, 30)
    crop = RandomResizedCrop(size, scale=(0.2, 1.0))
    with seeded_rngs(5):
        ours = crop(img)
    with seeded_rngs(5):
        left, top, w, h = crop_box(40, 30, (0.2, 1.0))
    theirs = F.resized_crop(img, top, left, h, w, [size, size] if isinstance(size, int) else list(size), antialias=True)
    assert ours.size == theirs.size and np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_the_flip_mirrors_at_its_rate_and_is_seeded() -> None:
    img = _image(9, 5)
    flip = RandomHorizontalFlip(0.3)
    with seeded_rngs(1):
        outs = [np.asarray(flip(img)) for _ in range(1000)]
    mirrored = sum(np.array_equal(o, np.asarray(img)[:, ::-1]) for o in outs)
    assert 240 < mirrored < 360
    with seeded_rngs(1):
        assert all(np.array_equal(o, np.asarray(flip(img))) for o in outs)
    assert all(np.array_equal(np.asarray(RandomHorizontalFlip(0.0)(img)), np.asarray(img)) for _ in range(20))
    assert torch.equal(v2.PILToTensor()(RandomHorizontalFlip(1.0)(img)), v2.PILToTensor()(img).flip(-1))


def test_the_boxes_are_distributed_as_torchvisions() -> None:
    """Same rule, other random stream: the area shares, aspects and positions of 4,000 boxes each
    match torchvision's in distribution (two-sample Kolmogorov-Smirnov distance, 5% critical 0.03)."""
    img = _image(48, 36)
    theirs_crop = v2.RandomResizedCrop(20, scale=(0.08, 1.0), antialias=True)
    torch.manual_seed(0)
    theirs = [theirs_crop.make_params([img]) for _ in range(4000)]
    rng = random.Random(0)
    ours = [crop_box(48, 36, (0.08, 1.0), rng=rng) for _ in range(4000)]

    def ks(a: list[float], b: list[float]) -> float:
        grid = np.sort(np.concatenate([a, b]))
        cdf = lambda xs: np.searchsorted(np.sort(xs), grid, side="right") / len(xs)  # noqa: E731
        return float(np.abs(cdf(np.asarray(a)) - cdf(np.asarray(b))).max())

    features = {"share": (lambda left, top, w, h: w * h / (48 * 36)), "aspect": (lambda left, top, w, h: w / h),
                "left": (lambda left, top, w, h: left), "top": (lambda left, top, w, h: top)}
    for name, f in features.items():
        a = [f(*box) for box in ours]
        b = [f(p["left"], p["top"], p["width"], p["height"]) for p in theirs]
        assert ks(a, b) < 0.03, name
