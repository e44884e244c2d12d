"""What every image-SSL recipe shares: its config sections besides ``model`` and ``loss``, and the
run itself (data, objective, trainer), so a method's recipe declares only its own sections."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from multissl.callbacks import recipe_trainer
from multissl.data.image_data import ImageDataConfig, ImageStream, prepare_images, stream_images
from multissl.data.views import AugmentConfig
from multissl.hub import HubConfig
from multissl.objectives.joint_embedding import CollapseConfig
from multissl.probe import ProbeConfig
from multissl.training.objective import Objective
from multissl.training.state import FitResult


@dataclass
class ImageSSLSections:
    """Data, views, probe, collapse warning and Hub sections of an image-SSL recipe's config."""

    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    probe: ProbeConfig = field(default_factory=lambda: ProbeConfig(task="digits"))
    """The online kNN and linear probe at every evaluation (embedded digits; ``probe.task=""`` = off)."""
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    hub: HubConfig = field(default_factory=HubConfig)


def fit_image_ssl(cfg: Any, make: Callable[..., Objective]) -> FitResult:
    """Prepare (or, with ``data.streaming``, stream) the images, build the objective with ``make(augment=,
    on_bad_image=, max_image_pixels=, collapse=)`` and train it. An objective with ``show_held_out``
    (MAE: its reconstruction picture) is handed the held-out images first."""
    trainer = recipe_trainer(cfg)
    with trainer.main_process_first():
        train, held_out = (stream_images if cfg.data.streaming else prepare_images)(cfg.data)
    if isinstance(train, ImageStream):  # nothing is counted up front: that is the point of a stream
        trainer.print(f"{train.source}: streaming, {cfg.data.validation_fraction:.0%} held out by name")
    else:
        trainer.print(f"{train.source}: {len(train)} training and {len(held_out) if held_out else 0} held-out images")
    objective = make(augment=cfg.augment, on_bad_image=cfg.data.on_bad_image,
                     max_image_pixels=cfg.data.max_image_pixels, collapse=cfg.collapse)
    if hasattr(objective, "show_held_out"):
        objective.show_held_out(held_out)
    return trainer.fit(objective, train, held_out)
