"""Augmented views for image SSL, built in DataLoader workers from torchvision's v2 transforms.

A collator decodes each image once and draws every view from it under `seeded_rngs`, seeded from
the batch's generator, so a batch is the same in any worker, with any worker count, and after a
resume. The defaults are SimCLR's (random resized crop 0.08-1, flip, colour jitter 0.8 at
strength 0.5 with 0.4/0.4/0.4/0.1 x strength, grayscale 0.2; blur off, as for small images).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from multissl.data.crops import RandomHorizontalFlip, RandomResizedCrop
from multissl.data.images import PixelPipeline, decode_and_transform, skipped_ids
from multissl.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AugmentConfig:
    """One view's augmentation recipe."""

    size: int = 32
    """Output side in pixels."""
    scale: tuple[float, float] = (0.08, 1.0)
    """Random resized crop: share of the image area kept."""
    flip: float = 0.5
    jitter: float = 0.8
    """Probability of colour jitter."""
    jitter_strength: float = 0.5
    """Brightness, contrast, saturation 0.8 x strength, hue 0.2 x strength (SimCLR's s)."""
    grayscale: float = 0.2
    blur: float = 0.0
    """Probability of a Gaussian blur (kernel ~10% of the side); SimCLR skips it on 32-pixel images."""
    solarize: float = 0.0
    second_view_blur: float | None = None
    """The second view's blur probability when it differs (BYOL and DINO: 1.0 for the first, 0.1 for
    the second); None = the same as ``blur``."""
    second_view_solarize: float | None = None
    """The second view's solarisation probability (BYOL and DINO: 0.2; the first view's 0); None = ``solarize``."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ConfigError(f"augment.size must be >= 8, got {self.size}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"augment.scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        for name in ("flip", "jitter", "grayscale", "blur", "solarize", "second_view_blur", "second_view_solarize"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"augment.{name} is a probability in [0, 1], got {value}")

    def view(self, index: int) -> AugmentConfig:
        """The recipe of view ``index`` (0 or 1): the second takes the ``second_view_*`` values."""
        if index == 0:
            return self
        return dataclasses.replace(
            self, blur=self.blur if self.second_view_blur is None else self.second_view_blur,
            solarize=self.solarize if self.second_view_solarize is None else self.second_view_solarize)


def view_transform(cfg: AugmentConfig) -> PixelPipeline:
    """The training view: PIL RGB image -> normalised float tensor (3, size, size). A step whose
    probability is 0 is left out (it would still draw a random number and cost a call per image)."""
    from torchvision.transforms import v2

    s = cfg.jitter_strength
    # on the PIL image until the end: PIL's resize and HSV conversion (hue jitter) are several times
    # faster than torchvision's tensor kernels for small images (8.5 -> ~2 ms a view at 32 px)
    steps: list[Any] = [RandomResizedCrop(cfg.size, scale=cfg.scale)]
    if cfg.flip > 0:
        steps.append(RandomHorizontalFlip(cfg.flip))
    if cfg.jitter > 0:
        steps.append(v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=cfg.jitter))
    if cfg.grayscale > 0:
        steps.append(v2.RandomGrayscale(cfg.grayscale))
    if cfg.blur > 0:
        kernel = max(3, (cfg.size // 10) | 1)
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=cfg.blur))
    if cfg.solarize > 0:
        steps.append(v2.RandomSolarize(128, p=cfg.solarize))
    return PixelPipeline(steps, cfg.mean, cfg.std)


@dataclass
class ViewsCollator:
    """``(samples, generator) -> {"views": [tensor (B, 3, H, W) per view], "labels", "skipped", "skipped_ids"}``.

    One transform per view (SimCLR's two are alike; DINO's global and local crops differ); bad
    images are skipped and counted (``on_bad_image="error"`` stops instead), ``skipped_ids`` naming
    them for the trainer's distinct count (`multissl.training.skips`). A batch whose images are all bad is an error
    unless ``allow_empty``: then it has no rows (views shaped ``(0, 3, H, W)``), for an objective
    that scores an empty batch as nothing."""

    transforms: list[Any]
    on_bad_image: str = "skip"
    max_image_pixels: int = 64_000_000
    allow_empty: bool = False

    def __call__(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, Any]:
        kept, views, skipped = decode_and_transform(samples, self.transforms, generator, self.on_bad_image,
                                                    self.max_image_pixels, self.allow_empty)
        kept_ids = {id(sample) for sample in kept}
        bad = [str(sample["path"]) for sample in samples if id(sample) not in kept_ids]
        labels = [int(sample.get("label", -1)) for sample in kept]
        return {"views": views, "labels": torch.tensor(labels, dtype=torch.long), "skipped": skipped,
                "skipped_ids": skipped_ids(bad)}
