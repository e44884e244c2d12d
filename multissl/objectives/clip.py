"""CLIP-style image–text contrastive pretraining over `open_clip` models, losses and transforms.

What open_clip provides is used as is: any of its model configs (or ours, registered with it), its
train/val transforms and tokenizer, `ClipLoss` (negatives gathered across processes with
gradients, loss over the local rows) and `SigLipLoss`, and its zero-shot classifier builder. What
this module adds for the shared trainer: the loss in the trainer's metric form, the logit-scale
clamp after every step, zero-shot accuracy and retrieval recall at eval time, and the output in
open_clip's Hub format (``open_clip_config.json`` + weights) that
``open_clip.create_model_and_transforms("local-dir:...")`` or ``"hf-hub:..."`` loads back.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from multissl.errors import ConfigError, first_line
from multissl.logs import quiet_root_logger
from multissl.metrics import Mean
from multissl.training.objective import ModelCardInfo, Objective

CONFIG_DIR = Path(__file__).parent / "clip_configs"
WEIGHTS_NAME = "open_clip_model.safetensors"  # open_clip's HF_SAFE_WEIGHTS_NAME
CONFIG_NAME = "open_clip_config.json"


@dataclass
class ClipModelConfig:
    name: str = "multissl-tiny"
    """An open_clip model name (``open_clip.list_models()``: ViT-B-32, RN50, ...) or one of ours:
    multissl-tiny (a 64-pixel ViT and a small text transformer that train on CPU in minutes)."""
    pretrained: str = ""
    """Start from a local open_clip checkpoint file, or a folder with open_clip_config.json + weights
    (as this recipe writes); nothing is downloaded."""
    image_size: int = 0
    """Override the model's input resolution (0 keeps it)."""


@dataclass
class ClipLossConfig:
    kind: Literal["clip", "siglip"] = "clip"
    """Softmax contrastive loss (CLIP) or the pairwise sigmoid loss (SigLIP)."""
    gather_with_grad: bool = True
    """Negatives from every process, with gradients flowing back through the gather (open_clip's
    --gather-with-grad); with local_loss, each process scores its own rows against all columns."""
    local_loss: bool = True
    max_logit_scale: float = 100.0
    """The learnable temperature exp(logit_scale) is clamped to this after every step (CLIP: 100)."""


@dataclass
class ClipEvalConfig:
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}.", "a drawing of a {}.", "a {}."])
    """Zero-shot prompts; ``{}`` is replaced by each class name, the prompts' embeddings averaged."""
    max_images: int = 2000
    """Held-out pairs used for retrieval and zero-shot (the first N), to bound eval time."""
    batch_size: int = 128


@functools.cache
def _register_our_configs() -> None:
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)


def build_clip(cfg: ClipModelConfig, loss: ClipLossConfig) -> tuple[nn.Module, Any, Any, Any, dict[str, Any]]:
    """``(model, train transform, eval transform, tokenizer, model config)`` from open_clip."""
    import open_clip

    _register_our_configs()
    kwargs: dict[str, Any] = {"output_dict": True}
    if loss.kind == "siglip":  # SigLIP's initialisation: temperature 10, bias -10
        kwargs.update(init_logit_scale=math.log(10), init_logit_bias=-10.0)
    if cfg.image_size:
        kwargs["force_image_size"] = cfg.image_size
    source = Path(cfg.pretrained).expanduser() if cfg.pretrained else None
    name = f"local-dir:{source}" if source is not None and source.is_dir() else cfg.name
    if source is not None and not source.exists():
        raise ConfigError(f"model.pretrained: no such file or folder: {source}")
    if source is None and name not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        raise ConfigError(f"model.name: unknown open_clip model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    try:
        with quiet_root_logger():  # "No pretrained weights loaded ... initialized randomly" is the point here
            model, train_tf, eval_tf = open_clip.create_model_and_transforms(
                name, pretrained=str(source) if source is not None and source.is_file() else None, **kwargs)
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, ValueError, OSError, KeyError) as err:
        raise ConfigError(f"model: cannot build open_clip model {name!r} ({first_line(err)})") from None
    if name.startswith("local-dir:"):
        model_cfg = json.loads((source / CONFIG_NAME).read_text())["model_cfg"]  # type: ignore[operator]
    else:
        model_cfg = open_clip.get_model_config(cfg.name)
        if cfg.image_size:
            model_cfg = {**model_cfg, "vision_cfg": {**model_cfg["vision_cfg"], "image_size": cfg.image_size}}
    return model, train_tf, eval_tf, tokenizer, model_cfg


def recall_at(similarity: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Share of rows whose matching column (the diagonal) ranks within the top k."""
    correct = similarity.diagonal()[:, None]
    rank = (similarity > correct).sum(1)  # columns scored strictly above the match
    return {k: float((rank < k).float().mean()) for k in ks}


class ClipPretraining(Objective):
    """Contrastive image–text alignment; batches of ``{"images", "texts", "labels", "skipped"}``."""

    name = "clip"
    modality = "image"

    def __init__(self, model_cfg: ClipModelConfig, loss: ClipLossConfig, eval_cfg: ClipEvalConfig,
                 make_collator: Any) -> None:
        """``make_collator(transform, tokenizer, sample_caption)`` builds the data's collator."""
        self.model, self.train_transform, self.eval_transform, self.tokenizer, self.model_config = build_clip(model_cfg, loss)
        self.model_name = model_cfg.name
        self.loss_cfg, self.eval_cfg = loss, eval_cfg
        self.train_collate = make_collator(self.train_transform, self.tokenizer, True)
        self.eval_collate = make_collator(self.eval_transform, self.tokenizer, False)
        self.eval_data: Any = None
        """Held-out pairs (with labels and ``classnames`` for zero-shot) that `on_evaluate` scores."""
        self._losses: dict[tuple[int, int], nn.Module] = {}

    def collator(self) -> Any:
        return self.train_collate

    def eval_collator(self) -> Any:
        return self.eval_collate

    def count(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"samples": int(batch["images"].shape[0]),
                "skipped_images": int(batch["skipped"]) if "skipped" in batch else 0}

    def _loss_fn(self, distributed: bool) -> nn.Module:
        from open_clip.loss import ClipLoss, SigLipLoss

        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        key = (rank, world)
        if key not in self._losses:
            if self.loss_cfg.kind == "siglip":
                self._losses[key] = SigLipLoss(rank=rank, world_size=world)
            else:
                self._losses[key] = ClipLoss(local_loss=self.loss_cfg.local_loss, gather_with_grad=self.loss_cfg.gather_with_grad,
                                             cache_labels=True, rank=rank, world_size=world)
        return self._losses[key]

    def compute(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        out = model(image=batch["images"], text=batch["texts"])
        # Negatives from all processes while training (every process steps together); eval batches
        # can be uneven across processes, so eval scores each batch on its own.
        distributed = model.training and torch.distributed.is_available() and torch.distributed.is_initialized()
        args = [out["image_features"], out["text_features"], out["logit_scale"]]
        if self.loss_cfg.kind == "siglip":
            args.append(out["logit_bias"])
        loss = self._loss_fn(distributed)(*args)
        n = out["image_features"].shape[0]
        with torch.no_grad():
            logits = out["image_features"] @ out["text_features"].T
            target = torch.arange(n, device=logits.device)
            i2t = (logits.argmax(1) == target).float().sum()
            t2i = (logits.argmax(0) == target).float().sum()
        return {
            "loss": Mean(loss * n, n),
            "batch_i2t_accuracy": Mean(i2t, n),
            "batch_t2i_accuracy": Mean(t2i, n),
            "logit_scale": out["logit_scale"].detach(),
        }

    def after_optimizer_step(self, model: nn.Module, step: int) -> dict[str, float]:
        """CLIP's clamp: exp(logit_scale) <= 100, so the softmax cannot become arbitrarily sharp."""
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(self.loss_cfg.max_logit_scale))
        return {}

    @torch.no_grad()
    def embed(self, model: nn.Module, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image and (first-)caption embeddings and labels of ``rows`` (bad images dropped)."""
        device = next(model.parameters()).device
        images, texts, labels = [], [], []
        for start in range(0, len(rows), self.eval_cfg.batch_size):
            batch = self.eval_collate(rows[start : start + self.eval_cfg.batch_size], torch.Generator().manual_seed(0))
            images.append(model.encode_image(batch["images"].to(device), normalize=True).float().cpu())
            texts.append(model.encode_text(batch["texts"].to(device), normalize=True).float().cpu())
            labels.append(batch["labels"])
        return torch.cat(images), torch.cat(texts), torch.cat(labels)

    def on_evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Retrieval recall both ways on held-out pairs, and zero-shot accuracy when they have labels."""
        if self.eval_data is None or not hasattr(self.eval_data, "__len__") or len(self.eval_data) == 0:
            return {}
        from multissl.training.loader import rows as read_rows

        was_training = model.training
        model.eval()
        try:
            count = min(len(self.eval_data), self.eval_cfg.max_images)
            image, text, labels = self.embed(model, read_rows(self.eval_data.data, list(range(count))))
            sim = image @ text.T
            metrics: dict[str, Any] = {"retrieval_chance": 1.0 / len(image)}
            for direction, matrix in (("image_to_text", sim), ("text_to_image", sim.T)):
                for k, value in recall_at(matrix).items():
                    metrics[f"{direction}_R@{k}"] = value
            classnames = getattr(self.eval_data, "classnames", None)
            if classnames and (labels >= 0).any():
                metrics.update(self.zero_shot(model, image, labels, classnames))
        finally:
            model.train(was_training)
        return metrics

    @torch.no_grad()
    def zero_shot(self, model: nn.Module, image: torch.Tensor, labels: torch.Tensor, classnames: list[str]) -> dict[str, float]:
        """Top-1/top-5 accuracy of classifying images by their similarity to prompted class names."""
        from open_clip.zero_shot_classifier import build_zero_shot_classifier

        device = next(model.parameters()).device
        weights = build_zero_shot_classifier(model, self.tokenizer, classnames, self.eval_cfg.templates,
                                             num_classes_per_batch=32, device=device, use_tqdm=False).float().cpu()
        known = labels >= 0
        logits = image[known] @ weights
        target = labels[known]
        top = logits.topk(min(5, len(classnames)), dim=1).indices
        return {"zero_shot_top1": float((top[:, 0] == target).float().mean()),
                "zero_shot_top5": float((top == target[:, None]).any(1).float().mean()),
                "zero_shot_chance": 1.0 / len(classnames)}

    def features(self, model: nn.Module, inputs: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        from multissl.models.features import image_features

        return image_features(model, self.eval_transform, inputs, batch_size)

    def save_pretrained(self, model: nn.Module, output_dir: Path) -> None:
        """open_clip's Hub layout: config with the preprocessing, and weights as safetensors (loadable
        with ``create_model_and_transforms("local-dir:<dir>")`` or ``(name, pretrained=<file>)``)."""
        from open_clip.push_to_hf_hub import save_config_for_hf
        from safetensors.torch import save_file

        output_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(output_dir / WEIGHTS_NAME))
        save_config_for_hf(model, output_dir / CONFIG_NAME, model_config=self.model_config)

    def model_card(self) -> ModelCardInfo:
        return ModelCardInfo(
            library_name="open_clip", pipeline_tag="zero-shot-image-classification", method="clip",
            card_metrics=("zero_shot_top1", "image_to_text_R@1", "text_to_image_R@1"),
            arch=self.model_name, size=self.model_name,
            parameters=sum(p.numel() for p in self.model.parameters()),
            auto_class="open_clip",
            usage=("import open_clip\n\n"
                      'model, _, preprocess = open_clip.create_model_and_transforms("{open_clip_ref}")\n'
                      'tokenizer = open_clip.get_tokenizer("{open_clip_ref}")\n'
                      "image = preprocess(pil_image).unsqueeze(0)\n"
                      'text = tokenizer(["a photo of a cat", "a photo of a dog"])\n'
                      "image_features = model.encode_image(image, normalize=True)\n"
                      "text_features = model.encode_text(text, normalize=True)\n"
                      "probs = (100 * image_features @ text_features.T).softmax(dim=-1)"),
        )
