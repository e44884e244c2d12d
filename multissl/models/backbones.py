"""Image backbones from timm, saved in timm's Hub format so ``timm.create_model("local-dir:...",
pretrained=True)`` (or ``"hf-hub:..."`` after a push) rebuilds them with no multissl code."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from multissl.errors import ConfigError, first_line

TINY = {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "zero_init_last": False, "output_stride": 8}
"""A resnet18 with one block a stage at a quarter of the width: 0.3M parameters, CPU-friendly. At
32 px an ImageNet ResNet ends on a 1x1 map; ``output_stride=8`` keeps 4x4 (+27% compute), and
residual branches that start non-zero give a random init whose features are not a few corner
pixels. SimCLR, 150 steps on the digits: linear probe 0.853 -> 0.943, kNN 0.711 -> 0.858."""


@dataclass
class BackboneConfig:
    name: str = "resnet18"
    """Any ``timm.list_models()`` name (resnet18, resnet50, vit_tiny_patch16_224, ...)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``timm.create_model`` arguments (e.g. ``layers``/``channels`` for a small ResNet, ``img_size``
    for a ViT); saved with the model, so timm rebuilds the same architecture."""
    size: str = "custom"
    """A label for the model card (tiny, small, base)."""


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """The timm model without a classifier (``num_classes=0``: ``model(x)`` is the pooled feature)."""
    import timm

    check_timm_name(cfg.name, "model.backbone.name")
    try:
        return timm.create_model(cfg.name, pretrained=False, num_classes=0, **cfg.kwargs)
    except TypeError as err:
        raise ConfigError(f"model.backbone.kwargs: {cfg.name} does not take them ({first_line(err)})") from None


def check_timm_name(name: str, key: str) -> None:
    """A one-line error, with the closest names, unless ``name`` is a timm architecture."""
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"{key}={name!r} is not a timm model{hint}")


def set_preprocessing(model: nn.Module, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Record the input the backbone is trained on in its ``pretrained_cfg`` (saved to config.json),
    so timm's ``resolve_data_config`` + ``create_transform`` rebuild the same eval transform."""
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    cfg.update(input_size=(3, size, size), test_input_size=(3, size, size), crop_pct=1.0, crop_mode="center",
               mean=tuple(mean), std=tuple(std), interpolation="bilinear",
               num_classes=getattr(model, "num_classes", 0))
    model.pretrained_cfg = cfg


def eval_transform_of(model: nn.Module) -> Any:
    """timm's eval transform for the backbone, as a user loading the saved folder would build it."""
    import timm

    return timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))


def save_backbone(model: nn.Module, output_dir: Path, label_names: Sequence[str] = ()) -> None:
    """``config.json`` (architecture, its arguments, the preprocessing in ``pretrained_cfg``; for a
    classifier ``num_classes`` and ``label_names``) and ``model.safetensors``, as timm writes them for
    the Hub (safetensors: the only weights a push uploads).

    ``num_classes`` is kept at the config's root only: timm rebuilds the classifier from it, and
    transformers' timm wrapper (``AutoModel...``, ``pipeline``) passes it to ``timm.create_model``
    itself, refusing a second one in ``model_args`` (timm 1.0.x writes it there too)."""
    import json

    from timm.models import save_for_hf

    output_dir.mkdir(parents=True, exist_ok=True)
    model_config: dict[str, Any] = {"num_classes": getattr(model, "num_classes", 0)}
    if label_names:
        model_config["label_names"] = list(label_names)
    save_for_hf(model, str(output_dir), model_config=model_config, safe_serialization=True)
    path = output_dir / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.get("model_args", {}).pop("num_classes", None)
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
