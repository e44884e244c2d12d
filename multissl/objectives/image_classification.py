"""Image classification with any timm model, fine-tuned from an image-SSL output or trained from scratch.

Start points (``model.init_from``): a run's output_dir or a timm folder (``config.json`` with
``architecture``, as timm's ``save_for_hf`` writes), ``hf-hub:ORG/NAME`` (or ``ORG/NAME``) for a timm
model on the Hub, a timm architecture name (random weights: nothing is downloaded), or nothing (the
0.3M-parameter ResNet of `multissl.models.backbones.TINY`). ``model.random_init`` keeps the start
point's architecture and preprocessing with fresh weights: the lift report's from-scratch arm.

Full fine-tuning is the default (and what ``multissl lift image-classification`` runs, as for the
other tasks); ``model.freeze_backbone=true`` is linear evaluation: only the classifier trains, and
the backbone stays in eval mode, so neither its weights nor its BatchNorm statistics move.

Training images get a seeded random resized crop (and an optional flip) in the DataLoader workers;
eval images get the model's own timm eval transform, the one a user of the saved folder rebuilds with
``timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))``. The saved folder is
the whole classifier in timm's Hub format, with ``num_classes`` and ``label_names``: timm
(``create_model("local-dir:...", pretrained=True)``) and transformers (``pipeline("image-classification")``)
load it with no multissl code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multissl.data.image_data import ImageDataConfig, ImageDataset, prepare_images
from multissl.data.images import decode_or_skip, seeded_rngs
from multissl.data.labels import LabelMap, infer_label_map, stratified_subset
from multissl.data.views import IMAGENET_MEAN, IMAGENET_STD
from multissl.errors import ConfigError, DataError, first_line
from multissl.objectives.classification import labelled_step, summarize_classification
from multissl.run_folder import looks_local
from multissl.training.objective import ModelCardInfo, Objective

NEW_MODEL_SIZE = 32
"""Input side of the new tiny ResNet (no init_from) unless ``model.image_size`` says otherwise."""


@dataclass
class ImageClassifierModelConfig:
    """Where the classifier starts and what trains."""

    init_from: str = ""
    """A run's output_dir or timm folder, ``hf-hub:ORG/NAME``, a timm name (random weights), or empty
    (a new tiny ResNet)."""
    random_init: bool = False
    """Keep init_from's architecture and preprocessing but start from random weights (the lift baseline)."""
    freeze_backbone: bool = False
    """Linear evaluation: train the classifier only, the backbone frozen in eval mode (BatchNorm
    statistics fixed). False = full fine-tuning (the default, and the lift's)."""
    image_size: int = 0
    """Input side in pixels; 0 = the start point's (a folder's saved input size, a timm name's default,
    32 for the new tiny ResNet). Another value keeps the start point's mean and std."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``timm.create_model`` arguments: ``drop_rate``, ``drop_path_rate``; for a timm name also the
    architecture's (``layers``, ``channels``, ``img_size``). Without init_from they update TINY's."""

    def __post_init__(self) -> None:
        if self.image_size < 0 or 0 < self.image_size < 8:
            raise ConfigError(f"model.image_size must be 0 (the start point's) or >= 8, got {self.image_size}")


@dataclass
class ClassifierAugmentConfig:
    """Training augmentation; eval images get the model's timm eval transform only."""

    scale: tuple[float, float] = (0.35, 1.0)
    """Random resized crop: share of the image area kept ([1, 1] = the whole image, resized)."""
    flip: float = 0.0
    """Horizontal flip probability: off by default (a flipped digit or letter is another symbol)."""

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"augment.scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0.0 <= self.flip <= 1.0:
            raise ConfigError(f"augment.flip is a probability in [0, 1], got {self.flip}")


@dataclass
class LabelledImageDataConfig(ImageDataConfig):
    """An image source where every image has a class: sub-folder names, or a dataset's label column."""

    label_fraction: float = 1.0
    """Train on this share of the training images, the same share of every class."""
    subset_seed: int = 0
    """Which images a label_fraction below 1 keeps."""
    eval_split: str = ""
    """A split of data.dataset to evaluate on (e.g. ``test``); empty = hold out validation_fraction."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"data.label_fraction must be in (0, 1], got {self.label_fraction}")
        if self.eval_split and not self.dataset:
            raise ConfigError("data.eval_split names a split of data.dataset; with data.files, "
                              "the eval images are held out by data.validation_fraction")
        if self.streaming:
            raise ConfigError("data.streaming is not supported for fine-tuning (label maps and label_fraction "
                              "subsets need the whole set)")
        if not self.eval_split and self.validation_fraction == 0:
            raise ConfigError("fine-tuning needs an eval split: set data.validation_fraction > 0 or data.eval_split")


# ------------------------------------------------------------------------------------ data
def _require_labels(ds: ImageDataset, where: str, column: str) -> None:
    """Every image has a class; the first one without is named."""
    missing = [p for p, y in zip(ds.paths(), ds.labels()) if y < 0]
    if missing:
        raise DataError(f"{where}: {len(missing)} of {len(ds)} images have no label (the first: {missing[0]}); put "
                        f"each image in a sub-folder named after its class, or give data.dataset with an integer "
                        f"or ClassLabel {column!r} column")


def label_splits(cfg: LabelledImageDataConfig) -> tuple[ImageDataset, ImageDataset, LabelMap]:
    """``(train, eval, labels)``: eval is ``data.eval_split`` or the images held out by a hash of their
    names (the split image pretraining and probes use, so a pretrained model is scored on images it
    never saw); training keeps ``label_fraction`` of every class. The label map is the sub-folder or
    ClassLabel names, else ``"0".."max"`` of the training split's integer labels."""
    if cfg.eval_split:
        train, _ = prepare_images(dataclasses.replace(cfg, validation_fraction=0.0))
        held, _ = prepare_images(dataclasses.replace(cfg, split=cfg.eval_split, validation_fraction=0.0))
        held.source = f"{held.source} (split {cfg.eval_split})"
    else:
        train, maybe_held = prepare_images(cfg)
        assert maybe_held is not None  # validation_fraction > 0 (checked by the config)
        held = maybe_held
    _require_labels(train, train.source, cfg.label_column)
    _require_labels(held, f"{held.source} (eval)", cfg.label_column)
    labels = infer_label_map(train.labels(), None, train.classnames)
    for ds, where in ((train, train.source), (held, f"{held.source} (eval)")):
        for path, label in zip(ds.paths(), ds.labels()):
            labels.to_id(int(label), f"{where}: {path}")
    keep = stratified_subset(train.labels(), cfg.label_fraction, cfg.subset_seed)
    return ImageDataset(train.data.select(keep), train.classnames, train.source), held, labels


# ----------------------------------------------------------------------------------- model
def _create(name: str, init_from: str, what: str = "cannot build the timm model", **kwargs: Any) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, **kwargs)
    except Exception as err:  # missing weights, bad kwargs, a torn safetensors file: many exception types
        raise ConfigError(f"model.init_from={init_from!r}: {what} ({type(err).__name__}: {first_line(err)})") from None


def build_image_classifier(cfg: ImageClassifierModelConfig, labels: LabelMap) -> tuple[nn.Module, str]:
    """``(timm model with a labels.num_labels-way classifier, base)``; ``base`` is where the pretrained
    weights came from ("" when they are random). A start point's classifier of another size is dropped
    (timm loads the rest); the preprocessing is the start point's unless ``cfg.image_size`` is set."""
    from multissl.models.backbones import TINY, check_timm_name, set_preprocessing
    from multissl.models.saved import find_timm_folder

    n, ref = labels.num_labels, cfg.init_from
    pretrained = not cfg.random_init
    if not ref:
        net, base = _create("resnet18", ref, num_classes=n, **{**TINY, **cfg.kwargs}), ""
        set_preprocessing(net, cfg.image_size or NEW_MODEL_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    elif looks_local(ref):
        folder = find_timm_folder(ref)
        net = _create(f"local-dir:{folder}", ref, pretrained=pretrained, num_classes=n, **cfg.kwargs)
        base = str(folder) if pretrained else ""
    elif ref.startswith("hf-hub:") or "/" in ref:
        hub_id = ref.removeprefix("hf-hub:")
        what = "cannot load it from the Hub" if ref.startswith("hf-hub:") else "no such folder, nor a timm model on the Hub"
        net = _create(f"hf-hub:{hub_id}", ref, what, pretrained=pretrained, num_classes=n, **cfg.kwargs)
        base = hub_id if pretrained else ""
    else:  # a bare architecture name: timm's pretrained tags would need a download, so random weights
        check_timm_name(ref, "model.init_from")
        net, base = _create(ref, ref, pretrained=False, num_classes=n, **cfg.kwargs), ""
    if cfg.image_size and ref:
        pcfg = net.pretrained_cfg
        set_preprocessing(net, cfg.image_size, tuple(pcfg.get("mean", IMAGENET_MEAN)), tuple(pcfg.get("std", IMAGENET_STD)))
    pcfg = dict(net.pretrained_cfg)
    pcfg.pop("label_descriptions", None)  # a start point's own classes would be saved beside ours
    net.pretrained_cfg = {**pcfg, "num_classes": n, "label_names": list(labels.names)}
    return net, base


class TimmClassifier(nn.Module):
    """The timm classifier, trained whole or (``freeze_backbone``) as a linear probe: then only the
    classifier's parameters train, and ``train()`` keeps everything else in eval mode, so BatchNorm
    running statistics and dropout stay as in evaluation. ``net`` is what gets exported."""

    def __init__(self, net: nn.Module, freeze_backbone: bool = False) -> None:
        super().__init__()
        self.net, self.freeze_backbone = net, freeze_backbone
        if freeze_backbone:
            head = {id(p) for p in net.get_classifier().parameters()}
            for p in net.parameters():
                p.requires_grad_(id(p) in head)

    def train(self, mode: bool = True) -> TimmClassifier:
        super().train(mode)
        if self.freeze_backbone:
            self.net.eval()
            self.net.get_classifier().train(mode)
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values)


def train_transform(cfg: ClassifierAugmentConfig, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """PIL RGB image -> normalised tensor (3, size, size): random resized crop, optional flip (PIL-side
    ops, several times faster than tensor kernels on small images)."""
    from torchvision.transforms import v2

    steps: list[Any] = [v2.RandomResizedCrop(size, scale=tuple(cfg.scale), antialias=True)]
    if cfg.flip > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.flip))
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


# ------------------------------------------------------------------------------- objective
@dataclass
class LabelledImageCollator:
    """``(samples, generator) -> {"pixel_values", "labels", "path", "skipped"}``: images decoded and
    transformed in the worker under RNGs seeded from the batch generator (the same batch in any worker
    and after a resume); a bad image is counted and skipped, its label and path with it."""

    transform: Any
    on_bad_image: str = "skip"
    max_image_pixels: int = 64_000_000

    def __call__(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, Any]:
        kept, skipped = decode_or_skip(samples, self.on_bad_image, self.max_image_pixels)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with seeded_rngs(seed):
            pixels = [self.transform(img) for _, img in kept]
        labels = [int(sample["label"]) for sample, _ in kept]
        paths = [str(sample["path"]) for sample, _ in kept]
        return {"pixel_values": torch.stack(pixels), "labels": torch.tensor(labels, dtype=torch.long),
                "path": paths, "skipped": skipped}


class ImageClassification(Objective):
    """Cross-entropy over image labels; accuracy and macro-F1; one prediction row per eval image."""

    name = "image-classification"
    best_metric = "accuracy"

    def __init__(self, net: nn.Module, labels: LabelMap, augment: ClassifierAugmentConfig,
                 freeze_backbone: bool = False, base_model: str = "", on_bad_image: str = "skip",
                 max_image_pixels: int = 64_000_000) -> None:
        from multissl.models.backbones import eval_transform_of

        self.model, self.labels, self.base_model = TimmClassifier(net, freeze_backbone), labels, base_model
        pcfg = net.pretrained_cfg
        self.train_tf = train_transform(augment, int(pcfg["input_size"][-1]), tuple(pcfg["mean"]), tuple(pcfg["std"]))
        self.eval_tf = eval_transform_of(net)
        self.on_bad_image, self.max_image_pixels = on_bad_image, max_image_pixels

    def collator(self) -> LabelledImageCollator:
        return LabelledImageCollator(self.train_tf, self.on_bad_image, self.max_image_pixels)

    def eval_collator(self) -> LabelledImageCollator:
        return LabelledImageCollator(self.eval_tf, self.on_bad_image, self.max_image_pixels)

    def count(self, batch: dict[str, Any]) -> dict[str, float]:
        return {"samples": int(batch["labels"].shape[0]), "skipped_images": int(batch["skipped"])}

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        return labelled_step(model(batch["pixel_values"]), batch, self.labels, model.training)

    def summarize(self, metrics: dict[str, float]) -> dict[str, float]:
        return summarize_classification(metrics, self.labels.num_labels)

    def export(self, model: nn.Module) -> nn.Module:
        return model.net if isinstance(model, TimmClassifier) else model

    def save_pretrained(self, model: nn.Module, output_dir: Path) -> None:
        from multissl.models.backbones import save_backbone

        save_backbone(model, output_dir, self.labels.names)

    def model_card(self) -> ModelCardInfo:
        net = self.export(self.model)
        arch = net.pretrained_cfg.get("architecture") or type(net).__name__
        return ModelCardInfo(
            method=self.name, arch=arch, size=f"{net.num_features} features, {self.labels.num_labels} classes",
            parameters=sum(p.numel() for p in net.parameters()), library_name="timm",
            pipeline_tag="image-classification", card_metrics=("accuracy", "macro_f1"), auto_class="timm",
            base_model=self.base_model, fine_tuned=True,
            usage=("import timm\n"
                   "from PIL import Image\n\n"
                   'model = timm.create_model("{open_clip_ref}", pretrained=True).eval()\n'
                   "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))\n"
                   'probs = model(transform(Image.open("image.png").convert("RGB")).unsqueeze(0)).softmax(-1)\n'
                   'print(model.pretrained_cfg["label_names"][int(probs.argmax())], float(probs.max()))\n'
                   '# or: transformers.pipeline("image-classification", model="{repo}")'))
