"""Image classification with any timm model or a transformers ViT-style encoder, fine-tuned from an
image-SSL output or trained from scratch.

Start points (``model.init_from``): a run's output_dir or a model folder, either timm's (``config.json``
with ``architecture``, as timm's ``save_for_hf`` writes) or a transformers ViT, DeiT or DINOv2 with its
``preprocessor_config.json`` (as the MAE recipe saves its encoder); ``hf-hub:ORG/NAME`` (or ``ORG/NAME``)
for a timm model on the Hub (a transformers Hub id is not taken: download it with
``huggingface_hub.snapshot_download`` and give the folder); a timm architecture name (random weights:
nothing is downloaded); or nothing (the 0.3M-parameter ResNet of `multissl.models.backbones.TINY`).
``model.random_init`` keeps the start point's architecture and preprocessing with fresh weights: the
lift report's from-scratch arm.

Full fine-tuning is the default (and what ``multissl lift image-classification`` runs, as for the
other tasks); ``model.freeze_backbone=true`` is linear evaluation: only the classifier trains, and
the backbone stays in eval mode, so neither its weights nor its BatchNorm statistics move.

Training images get a seeded random resized crop (and an optional flip) in the DataLoader workers,
normalised as the start point's eval preprocessing normalises. Eval images get exactly what a user of
the saved folder gets: timm's eval transform (``timm.data.create_transform(**timm.data.resolve_data_config(
{}, model=model))``), or the transformers image processor itself, as ``pipeline`` runs it. The saved
folder is the whole classifier: in timm's Hub format with ``num_classes`` and ``label_names``, or a
transformers ``*ForImageClassification`` with ``id2label`` beside its image processor; either loads in
``transformers.pipeline("image-classification")`` with no multissl code. A transformers ViT classifies
from its CLS token (``ViTForImageClassification``; DINOv2's head also reads the mean patch token), while
probes take the mean of the patch tokens (`multissl.models.features.vit_features`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multissl.data.crops import RandomHorizontalFlip, RandomResizedCrop
from multissl.data.image_data import ImageDataConfig, ImageDataset, prepare_images
from multissl.data.images import PixelPipeline, decode_and_transform, skipped_ids
from multissl.data.labels import LabelMap, infer_label_map, stratified_subset
from multissl.data.views import IMAGENET_MEAN, IMAGENET_STD
from multissl.errors import ConfigError, DataError, first_line
from multissl.metrics import Mean
from multissl.models.layer_decay import layer_decay_multipliers
from multissl.objectives.classification import labelled_step, summarize_classification
from multissl.objectives.finetune import finetuned_card
from multissl.run_folder import looks_local
from multissl.training.distributed import StepRows, kept_buffers
from multissl.training.objective import ModelCardInfo, Objective, ParamGroup, TrainContext
from multissl.training.skips import BadInputs

CARD_METRICS = ("accuracy", "macro_f1")
NEW_MODEL_SIZE = 32
"""Input side of the new tiny ResNet (no init_from) unless ``model.image_size`` says otherwise."""


@dataclass
class ImageClassifierModelConfig:
    """Where the classifier starts and what trains."""

    init_from: str = ""
    """A run's output_dir, a timm folder or a transformers ViT/DeiT/DINOv2 folder, ``hf-hub:ORG/NAME`` (timm),
    a timm name (random weights), or empty (a new tiny ResNet)."""
    random_init: bool = False
    """Keep init_from's architecture and preprocessing but start from random weights (the lift baseline)."""
    freeze_backbone: bool = False
    """Linear evaluation: train the classifier only, the backbone frozen in eval mode (BatchNorm
    statistics fixed). False = full fine-tuning (the default, and the lift's)."""
    image_size: int = 0
    """Input side in pixels; 0 = the start point's (a folder's saved input size, a timm name's default,
    32 for the new tiny ResNet). Another value keeps the start point's mean and std (timm start points
    only: a transformers model keeps its image processor's size)."""
    layer_decay: float = 1.0
    """Layer-wise lr decay for a ViT (BEiT's, MAE's fine-tuning recipe: 0.65-0.75): layer i of L trains
    at ``lr x layer_decay^(L + 1 - i)``, the embeddings slowest, the head at ``lr``; 1.0 = one lr."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``timm.create_model`` arguments: ``drop_rate``, ``drop_path_rate``; for a timm name also the
    architecture's (``layers``, ``channels``, ``img_size``). Without init_from they update TINY's. For a
    transformers start point, settings of its config (``hidden_dropout_prob``, ...)."""

    def __post_init__(self) -> None:
        if self.image_size < 0 or 0 < self.image_size < 8:
            raise ConfigError(f"model.image_size must be 0 (the start point's) or >= 8, got {self.image_size}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"model.layer_decay must be in (0, 1], got {self.layer_decay}")


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
    """``(model with a labels.num_labels-way classifier, base)``; ``base`` is where the pretrained weights
    came from ("" when they are random). A timm model for timm start points, a transformers
    ``*ForImageClassification`` for transformers ones (its image processor: `load_image_processor`). A
    start point's classifier of another size is dropped (the rest is loaded); the preprocessing is the
    start point's unless ``cfg.image_size`` is set."""
    from multissl.models.backbones import TINY, check_timm_name, set_preprocessing
    from multissl.models.saved import find_image_folder

    n, ref = labels.num_labels, cfg.init_from
    pretrained = not cfg.random_init
    if not ref:
        net, base = _create("resnet18", ref, num_classes=n, **{**TINY, **cfg.kwargs}), ""
        set_preprocessing(net, cfg.image_size or NEW_MODEL_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    elif looks_local(ref):
        folder, library = find_image_folder(ref)
        if library == "transformers":
            return _transformers_classifier(cfg, labels, folder)
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


def _transformers_classifier(cfg: ImageClassifierModelConfig, labels: LabelMap, folder: Path) -> tuple[nn.Module, str]:
    """``AutoModelForImageClassification`` of a ViT-style folder with our labels (``from_config`` for
    random_init); ``model.kwargs`` must name settings its config has, or a typo would be saved silently."""
    from transformers import AutoConfig, AutoModelForImageClassification

    from multissl.models.saved import VISION_MODEL_TYPES
    from multissl.objectives.finetune import load_for_finetuning

    ref = cfg.init_from
    if cfg.image_size:
        raise ConfigError(f"model.image_size={cfg.image_size}: a transformers image model ({folder}) keeps the input "
                          "size of its image processor; leave model.image_size at 0")
    try:
        known = AutoConfig.from_pretrained(folder).to_dict()
    except Exception as err:  # a torn or foreign config.json
        raise ConfigError(f"model.init_from={ref!r}: cannot load a model config ({first_line(err)})") from None
    unknown = sorted(set(cfg.kwargs) - set(known))
    if unknown:
        raise ConfigError(f"model.kwargs: {', '.join(unknown)} not in the {known['model_type']!r} config of {folder} "
                          "(for a transformers model, kwargs are settings of its config, e.g. hidden_dropout_prob)")
    net, source = load_for_finetuning(AutoModelForImageClassification, ref, cfg.random_init, VISION_MODEL_TYPES,
                                      id2label=labels.id2label, label2id=labels.label2id, **cfg.kwargs)
    return net, "" if cfg.random_init else source


def load_image_processor(cfg: ImageClassifierModelConfig) -> Any | None:
    """The transformers image processor saved with ``model.init_from`` (what `build_image_classifier`
    built a ``*ForImageClassification`` from; kept for random_init too), None for timm start points."""
    from multissl.models.saved import find_image_folder

    ref = cfg.init_from
    if not ref or not looks_local(ref):
        return None
    folder, library = find_image_folder(ref)
    if library != "transformers":
        return None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(folder)
    except Exception as err:  # a torn or foreign preprocessor_config.json
        raise ConfigError(f"model.init_from={ref!r}: cannot load the image processor in {folder} "
                          f"({first_line(err)})") from None


InputSpec = tuple[int | tuple[int, int], tuple[float, ...], tuple[float, ...]]
"""``(size, mean, std)`` of the network's input: what the training transform produces."""


class ImageClassifier(nn.Module):
    """A classifier network (``net``, what gets exported), trained whole or (``freeze_backbone``) as a
    linear probe: then only the classifier's parameters train, and ``train()`` keeps everything else in
    eval mode, so BatchNorm running statistics and dropout stay as in evaluation. Subclasses say what
    depends on the library: the classifier module, the preprocessing, the saved folder, the card."""

    def __init__(self, net: nn.Module, freeze_backbone: bool = False) -> None:
        super().__init__()
        self.net, self.freeze_backbone = net, freeze_backbone
        if freeze_backbone:
            head = {id(p) for p in self.head().parameters()}
            for p in net.parameters():
                p.requires_grad_(id(p) in head)

    def head(self) -> nn.Module:
        raise NotImplementedError

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if self.freeze_backbone:
            self.net.eval()
            self.head().train(mode)
        return self

    def input_spec(self) -> InputSpec:
        raise NotImplementedError

    def eval_transform(self) -> Any:
        """PIL RGB image -> the tensor the saved folder's users feed the model (picklable: workers run it)."""
        raise NotImplementedError

    def save(self, net: nn.Module, output_dir: Path, label_names: tuple[str, ...]) -> None:
        raise NotImplementedError

    def card(self, net: nn.Module, method: str, base_model: str, num_labels: int) -> ModelCardInfo:
        raise NotImplementedError


class TimmClassifier(ImageClassifier):
    """A timm classifier, saved in timm's Hub format; its preprocessing is its ``pretrained_cfg``."""

    def head(self) -> nn.Module:
        return self.net.get_classifier()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values)

    def input_spec(self) -> InputSpec:
        pcfg = self.net.pretrained_cfg
        return int(pcfg["input_size"][-1]), tuple(pcfg["mean"]), tuple(pcfg["std"])

    def eval_transform(self) -> Any:
        from multissl.models.backbones import eval_transform_of

        return eval_transform_of(self.net)

    def save(self, net: nn.Module, output_dir: Path, label_names: tuple[str, ...]) -> None:
        from multissl.models.backbones import save_backbone

        save_backbone(net, output_dir, label_names)

    def card(self, net: nn.Module, method: str, base_model: str, num_labels: int) -> ModelCardInfo:
        arch = net.pretrained_cfg.get("architecture") or type(net).__name__
        return ModelCardInfo(
            method=method, arch=arch, size=f"{net.num_features} features, {num_labels} classes",
            parameters=sum(p.numel() for p in net.parameters()), library_name="timm",
            pipeline_tag="image-classification", card_metrics=CARD_METRICS, auto_class="timm",
            base_model=base_model, fine_tuned=True,
            usage=("import timm\n"
                   "from PIL import Image\n\n"
                   'model = timm.create_model("{open_clip_ref}", pretrained=True).eval()\n'
                   "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))\n"
                   'probs = model(transform(Image.open("image.png").convert("RGB")).unsqueeze(0)).softmax(-1)\n'
                   'print(model.pretrained_cfg["label_names"][int(probs.argmax())], float(probs.max()))\n'
                   '# or: transformers.pipeline("image-classification", model="{repo}")'))


@dataclass
class ProcessorTransform:
    """PIL image -> ``(3, H, W)`` by a transformers image processor, one image as ``pipeline`` feeds it."""

    processor: Any

    def __call__(self, image: Any) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


class TransformersImageClassifier(ImageClassifier):
    """A transformers ``*ForImageClassification`` (ViT, DeiT, DINOv2) returning its logits, with the image
    processor it is saved beside; ``id2label``/``label2id`` are in its config."""

    def __init__(self, net: nn.Module, processor: Any, freeze_backbone: bool = False) -> None:
        super().__init__(net, freeze_backbone)
        self.processor = processor

    def head(self) -> nn.Module:
        return self.net.classifier

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=pixel_values).logits

    def input_spec(self) -> InputSpec:
        """The processor's output size, and its mean/std rescaled to act on [0, 1] pixels (the training
        transform's ``ToDtype(scale=True)``), so a training image is normalised as an eval image is."""
        p = self.processor
        size = p.crop_size if getattr(p, "do_center_crop", False) else p.size
        h, w = size.get("height"), size.get("width")
        if not (h and w):
            h = w = size.get("shortest_edge")
        if not h:
            raise ConfigError(f"{type(p).__name__}: its size {dict(size)} gives neither height and width nor "
                              "shortest_edge: cannot tell what size to train on")
        scale = 255.0 * (p.rescale_factor if getattr(p, "do_rescale", True) else 1.0)
        normalize = getattr(p, "do_normalize", True)
        mean, std = (p.image_mean, p.image_std) if normalize else (0.0, 1.0)
        mean, std = ([v] * 3 if isinstance(v, (int, float)) else list(v) for v in (mean, std))
        return (int(h), int(w)), tuple(m / scale for m in mean), tuple(s / scale for s in std)

    def eval_transform(self) -> ProcessorTransform:
        return ProcessorTransform(self.processor)

    def save(self, net: nn.Module, output_dir: Path, label_names: tuple[str, ...]) -> None:
        net.save_pretrained(output_dir)
        self.processor.save_pretrained(output_dir)

    def card(self, net: nn.Module, method: str, base_model: str, num_labels: int) -> ModelCardInfo:
        return finetuned_card(
            net, method, base_model, pipeline_tag="image-classification", card_metrics=CARD_METRICS,
            auto_class="AutoModelForImageClassification",
            usage=("from PIL import Image\n"
                   "from transformers import pipeline\n\n"
                   'classify = pipeline("image-classification", model="{repo}")\n'
                   'print(classify(Image.open("image.png")))'))


def train_transform(cfg: ClassifierAugmentConfig, size: int | tuple[int, int], mean: tuple[float, ...],
                    std: tuple[float, ...]) -> Any:
    """PIL RGB image -> normalised tensor (3, size, size) (or (3, height, width)): random resized crop,
    optional flip (PIL-side ops, several times faster than tensor kernels on small images)."""

    steps: list[Any] = [RandomResizedCrop(size, scale=tuple(cfg.scale))]
    if cfg.flip > 0:
        steps.append(RandomHorizontalFlip(cfg.flip))
    return PixelPipeline(steps, mean, std)


# ------------------------------------------------------------------------------- objective
@dataclass
class LabelledImageCollator:
    """``(samples, generator) -> {"pixel_values", "labels", "path", "skipped", "skipped_ids"}``: images
    decoded and transformed in the worker under RNGs seeded from the batch generator (the same batch in
    any worker and after a resume); a bad image is counted and skipped, its label and path with it
    (``skipped_ids`` naming it for the trainer's distinct count). A batch whose images are all bad has no rows."""

    transform: Any
    on_bad_image: str = "skip"
    max_image_pixels: int = 64_000_000

    def __call__(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, Any]:
        kept, (pixels,), skipped = decode_and_transform(samples, [self.transform], generator, self.on_bad_image,
                                                        self.max_image_pixels, allow_empty=True)
        labels = [int(sample["label"]) for sample in kept]
        paths = [str(sample["path"]) for sample in kept]
        kept_ids = {id(sample) for sample in kept}
        bad = [str(sample["path"]) for sample in samples if id(sample) not in kept_ids]
        return {"pixel_values": pixels, "labels": torch.tensor(labels, dtype=torch.long),
                "path": paths, "skipped": skipped, "skipped_ids": skipped_ids(bad)}


class ImageClassification(Objective):
    """Cross-entropy over image labels; accuracy and macro-F1; one prediction row per eval image.

    Bad images are counted skips (each file once, across a resume) and are in no metric nor
    prediction; a step whose batches had no usable image on any process is not taken (its gradients
    are dropped: AdamW's moments, step count and weight decay stay). An evaluation in which no
    held-out image could be used is an error: there is nothing to choose the exported model by."""

    name = "image-classification"
    best_metric = "accuracy"

    def __init__(self, net: nn.Module, labels: LabelMap, augment: ClassifierAugmentConfig,
                 freeze_backbone: bool = False, base_model: str = "", on_bad_image: str = "skip",
                 max_image_pixels: int = 64_000_000, processor: Any = None, layer_decay: float = 1.0) -> None:
        """``net`` from `build_image_classifier`; ``processor`` (`load_image_processor`) is required
        with a transformers model, whose eval preprocessing it is; ``layer_decay`` < 1 trains a ViT's
        earlier layers slower (`multissl.models.layer_decay`)."""
        self.layer_decay = layer_decay
        if processor is not None:
            self.model: ImageClassifier = TransformersImageClassifier(net, processor, freeze_backbone)
        elif hasattr(net, "pretrained_cfg"):
            self.model = TimmClassifier(net, freeze_backbone)
        else:
            raise ValueError(f"{type(net).__name__}: a transformers image classifier needs its image processor "
                             "(load_image_processor)")
        self.labels, self.base_model = labels, base_model
        self.train_tf = train_transform(augment, *self.model.input_spec())
        self.eval_tf = self.model.eval_transform()
        self.on_bad_image, self.max_image_pixels = on_bad_image, max_image_pixels
        self.step_rows = StepRows()
        self.device = torch.device("cpu")

    def collator(self) -> LabelledImageCollator:
        return LabelledImageCollator(self.train_tf, self.on_bad_image, self.max_image_pixels)

    def eval_collator(self) -> LabelledImageCollator:
        return LabelledImageCollator(self.eval_tf, self.on_bad_image, self.max_image_pixels)

    def count(self, batch: dict[str, Any]) -> dict[str, float | BadInputs]:
        """Usable images, and the ids of the bad ones (``skipped_images``: the trainer counts each file once)."""
        return {"samples": int(batch["labels"].shape[0]), "skipped_images": BadInputs.of(batch)}

    def setup(self, context: TrainContext) -> None:
        self.device = context.device

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        if self.layer_decay == 1.0:
            return super().param_groups(model)
        return [ParamGroup(params, name=f"layer_{i}", lr_multiplier=multiplier)
                for i, (multiplier, params) in enumerate(layer_decay_multipliers(model, self.layer_decay))]

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        pixels = batch["pixel_values"]
        if model.training:
            self.step_rows.add(pixels.shape[0])
        if pixels.shape[0] > 0:
            return labelled_step(model(pixels), batch, self.labels, model.training)
        # every image of the batch was bad: two blank stand-ins go through the model (a ViT cannot
        # forward zero rows; under DDP every process must run the forward and backward), their
        # outputs cut to none and the model's buffers put back; every metric counts nothing
        with kept_buffers(model):
            logits = model(pixels.new_zeros((2, *pixels.shape[1:])))[:0]
        zero = logits.float().sum()
        out: dict[str, Any] = {"loss": Mean(zero, 0), "accuracy": Mean(zero.detach(), 0)}
        if not model.training:  # the pooled counts behind macro-F1, and no prediction row
            out.update({f"_{kind}{c}": Mean(zero.detach(), 0) for c in range(self.labels.num_labels)
                        for kind in ("tp", "fp", "fn")})
            out["predictions"] = []
        return out

    def before_optimizer_step(self, model: nn.Module, step: int) -> None:
        if self.step_rows.none_anywhere(self.device):
            StepRows.drop_gradients(model)

    def on_step_end(self, step: int) -> dict[str, float]:
        self.step_rows.reset()
        return {}

    def summarize(self, metrics: dict[str, float]) -> dict[str, float]:
        """Macro-F1 from the pooled counts; an evaluation that scored no image is a `DataError`."""
        if "accuracy" in metrics and not metrics["accuracy"] == metrics["accuracy"]:  # NaN: a count of 0
            raise DataError("no held-out image of this evaluation could be used (each one read was bad; the "
                            "warnings above name them): fix or remove them, or evaluate on other images "
                            "(data.eval_split, data.validation_fraction, trainer.eval_max_batches)")
        return summarize_classification(metrics, self.labels.num_labels)

    def export(self, model: nn.Module) -> nn.Module:
        return model.net if isinstance(model, ImageClassifier) else model

    def save_pretrained(self, model: nn.Module, output_dir: Path) -> None:
        self.model.save(model, output_dir, self.labels.names)

    def model_card(self) -> ModelCardInfo:
        return self.model.card(self.export(self.model), self.name, self.base_model, self.labels.num_labels)
