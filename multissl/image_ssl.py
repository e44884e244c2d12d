"""What every image-SSL recipe shares: its config sections besides ``model`` and ``loss``, and the
run itself (data, objective, trainer), so a method's recipe declares only its own sections.

A bad image ends no run: the objectives count and skip it in training and eval, and the probe run
at each evaluation leaves out (and counts) the probe images that do not decode."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from multissl.callbacks import ProbeCallback, standard_callbacks
from multissl.data.image_data import ImageDataConfig, ImageStream, prepare_images, stream_images
from multissl.data.images import BadImage, load_image
from multissl.data.views import AugmentConfig
from multissl.hub import HubConfig
from multissl.objectives.joint_embedding import CollapseConfig
from multissl.probe import ProbeConfig, ProbeData, load_probe_data, probe_features
from multissl.training.objective import Objective
from multissl.training.state import FitResult
from multissl.training.trainer import Trainer

NAMED_BAD = 3
"""Bad probe images named in the one warning (the rest are counted)."""


@dataclass
class ImageSSLSections:
    """Data, views, probe, collapse warning and Hub sections of an image-SSL recipe's config."""

    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    probe: ProbeConfig = field(default_factory=lambda: ProbeConfig(task="digits"))
    """The online kNN and linear probe at every evaluation (embedded digits; ``probe.task=""`` = off)."""
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    hub: HubConfig = field(default_factory=HubConfig)


def _bad_images(items: tuple[Any, ...]) -> set[str]:
    """The image files among ``items`` that do not decode (each one read once)."""
    bad = set()
    for item in items:
        if isinstance(item, (str, Path)):
            try:
                load_image(item, str(item))
            except BadImage:
                bad.add(str(item))
    return bad


def _without(items: tuple[Any, ...], labels: tuple[int, ...], bad: set[str]) -> tuple[tuple[Any, ...], tuple[int, ...]]:
    """``items`` and their ``labels`` without the items named in ``bad``."""
    kept = [(x, y) for x, y in zip(items, labels) if str(x) not in bad]
    return tuple(x for x, _ in kept), tuple(y for _, y in kept)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the probe, then every submodule's own train/eval flag back."""
    import torch

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


class ImageProbeCallback(ProbeCallback):
    """The probe of an image-SSL run, where the probe's own image files (``probe.task=files``) may be
    bad: each is screened once, and those that do not decode are left out of both splits with their
    labels, named in one warning and counted in ``probe/skipped_images``, rather than ending the run
    at its first evaluation. Should no eval (or training) image remain, the probe is left out of the
    record, with a warning. The embedded tasks' images are known good and are not screened."""

    def __init__(self, cfg: ProbeConfig) -> None:
        super().__init__(cfg)
        self._screened: tuple[ProbeData, ProbeData, int] | None = None

    def _usable(self, trainer: Trainer, data: ProbeData) -> tuple[ProbeData, int]:
        """``data`` without its bad images, and how many there were (screened once per data set)."""
        if self._screened is not None and self._screened[0] is data:
            return self._screened[1], self._screened[2]
        bad = _bad_images((*data.train, *data.eval))
        train, train_y = _without(data.train, data.train_labels, bad)
        held, held_y = _without(data.eval, data.eval_labels, bad)
        usable = replace(data, train=train, train_labels=train_y, eval=held, eval_labels=held_y)
        if bad:
            named = ", ".join(sorted(bad)[:NAMED_BAD])
            trainer.print(f"warning: probe.files: {len(bad)} image(s) could not be used and are left out of the probe "
                          f"({named}{', ...' if len(bad) > NAMED_BAD else ''})")
        self._screened = (data, usable, len(bad))
        return usable, len(bad)

    def on_evaluate(self, trainer: Trainer, objective: Objective, model: nn.Module) -> dict[str, Any]:
        if self.cfg.task != "files" or objective.modality != "image":
            return super().on_evaluate(trainer, objective, model)
        import torch

        data, skipped = self._usable(trainer, load_probe_data(self.cfg, "image"))
        record: dict[str, Any] = {"probe/skipped_images": skipped} if skipped else {}
        if not data.train or not data.eval:
            if not self._warned:
                trainer.print(f"warning: no probe: {len(data.train)} training and {len(data.eval)} eval images of "
                              "probe.files could be used")
                self._warned = True
            return record
        with _frozen(model):
            train_x = objective.features(model, data.train, self.cfg.batch_size)
            eval_x = objective.features(model, data.eval, self.cfg.batch_size)
        metrics = probe_features(train_x, torch.tensor(data.train_labels), eval_x, torch.tensor(data.eval_labels),
                                 len(data.classnames), self.cfg)
        return {**{f"probe/{k}": v for k, v in metrics.items()}, **record}


def image_ssl_trainer(cfg: Any) -> Trainer:
    """The trainer of an image-SSL recipe: the standard callbacks, with the probe that skips bad images."""
    callbacks = [ImageProbeCallback(c.cfg) if type(c) is ProbeCallback else c for c in standard_callbacks(cfg)]
    return Trainer(cfg.trainer, run_config=cfg, callbacks=callbacks)


def fit_image_ssl(cfg: Any, make: Callable[..., Objective]) -> FitResult:
    """Prepare (or, with ``data.streaming``, stream) the images, build the objective with ``make(augment=,
    on_bad_image=, max_image_pixels=, collapse=)`` and train it. An objective with ``show_held_out``
    (MAE: its reconstruction picture) is handed the held-out images first."""
    trainer = image_ssl_trainer(cfg)
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
