"""CLIP-style image–text contrastive pretraining over `open_clip` models, losses and transforms.

What open_clip provides is used as is: any of its model configs (or ours, registered with it), its
train/val transforms and tokenizer, its cross-process feature gather (with gradients), and its
zero-shot classifier builder. What this module adds for the shared trainer: CLIP's and SigLIP's
losses over the rows whose image could be used (`MaskedContrastiveLoss`: open_clip's `ClipLoss` and
`SigLipLoss` on full batches, nothing from a bad image's row), in the trainer's metric form; bad
images counted once per file; the logit-scale clamp after every step, zero-shot accuracy and
retrieval recall at eval time, and the output in open_clip's Hub format (``open_clip_config.json``
+ weights) that ``open_clip.create_model_and_transforms("local-dir:...")`` or ``"hf-hub:..."`` loads back.
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
from multissl.training.distributed import gather_with_grad
from multissl.training.objective import ModelCardInfo, Objective
from multissl.training.skips import BadInputs

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
    siglip = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}
    """SigLIP's initialisation, temperature 10 and bias -10; in the saved config too (as open_clip's
    own SigLIP configs have it), without which open_clip builds no bias to load the trained one into."""
    if loss.kind == "siglip":
        kwargs.update(siglip)
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
    if loss.kind == "siglip":
        model_cfg = {**siglip, **model_cfg}
    return model, train_tf, eval_tf, tokenizer, model_cfg


MASKED = -1e9
"""Logit of a bad image's column: exp(MASKED - x) is exactly 0 in float32, and finite, so no NaN reaches a gradient."""


def _gather_mask(valid: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every process's ``valid`` rows in rank order (no gradient; as floats, which every backend gathers)."""
    parts = [torch.zeros_like(valid, dtype=torch.float32) for _ in range(world_size)]
    torch.distributed.all_gather(parts, valid.float())
    return torch.cat(parts) > 0.5


def _masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy in float32 with the ``columns`` that are False left out of every softmax."""
    return nn.functional.cross_entropy(logits.float().masked_fill(~columns[None, :], MASKED), target, reduction="none")


class MaskedContrastiveLoss:
    """CLIP's softmax loss or SigLIP's sigmoid loss over the rows whose ``valid`` is True: a bad image's
    row is neither an anchor nor a negative. With every row valid it equals open_clip's `ClipLoss`
    (``local_loss``, ``gather_with_grad``, its gather) or `SigLipLoss` (whose neighbour exchange is
    here one gather of the texts with gradients: the same sums), values and gradients.

    `sums` gives ``(total, count)``, the loss being ``total / count`` with ``count`` this process's
    valid rows, which is how the trainer weighs processes (`multissl.metrics.Mean`); a batch with no
    valid row gives a total of 0 that still depends on the features, so every process runs the same
    backward and gathers (the batch shapes are the same everywhere: bad rows are kept as zeros).
    """

    def __init__(self, kind: str = "clip", local_loss: bool = True, gather_with_grad: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        self.kind, self.local_loss, self.gather_with_grad = kind, local_loss, gather_with_grad
        self.rank, self.world_size = rank, world_size

    def __call__(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
        total, count = self.sums(image, text, scale, bias, valid)
        return total / count.clamp_min(1)

    def sums(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
             valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(total, count)`` for normalised ``(n, D)`` image and text features of this process's rows."""
        n = image.shape[0]
        valid = torch.ones(n, dtype=torch.bool, device=image.device) if valid is None else valid.to(image.device, torch.bool)
        count = valid.sum().float()
        world = self.world_size
        all_valid = _gather_mask(valid, world) if world > 1 else valid
        offset = self.rank * n if world > 1 else 0
        if self.kind == "siglip":
            all_text = gather_with_grad(text) if world > 1 else text
            logits = (scale * image @ all_text.T + (bias if bias is not None else 0.0)).float()
            labels = -torch.ones_like(logits)
            labels[torch.arange(n, device=logits.device), offset + torch.arange(n, device=logits.device)] = 1.0
            pairs = valid[:, None] & all_valid[None, :]
            terms = -nn.functional.logsigmoid(labels * logits)
            return torch.where(pairs, terms, torch.zeros_like(terms)).sum(), count
        if world > 1:
            from open_clip.loss import gather_features

            all_image, all_text = gather_features(image, text, local_loss=self.local_loss,
                                                  gather_with_grad=self.gather_with_grad, rank=self.rank,
                                                  world_size=world)
        else:
            all_image, all_text = image, text
        if world > 1 and not self.local_loss:  # every process scores the whole gathered batch
            logits = scale * all_image @ all_text.T
            target = torch.arange(logits.shape[0], device=logits.device)
            ce = (_masked_cross_entropy(logits, target, all_valid) + _masked_cross_entropy(logits.T, target, all_valid)) / 2
            whole = torch.where(all_valid, ce, torch.zeros_like(ce)).sum() / all_valid.sum().clamp_min(1)
            return whole * count, count
        target = offset + torch.arange(n, device=image.device)
        ce = (_masked_cross_entropy(scale * image @ all_text.T, target, all_valid)
              + _masked_cross_entropy(scale * text @ all_image.T, target, all_valid)) / 2
        return torch.where(valid, ce, torch.zeros_like(ce)).sum(), count


def recall_at(similarity: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Share of rows whose matching column (the diagonal) ranks within the top k."""
    correct = similarity.diagonal()[:, None]
    rank = (similarity > correct).sum(1)  # columns scored strictly above the match
    return {k: float((rank < k).float().mean()) for k in ks}


class ClipPretraining(Objective):
    """Contrastive image–text alignment; batches of ``{"images", "texts", "labels", "valid"?, "skipped",
    "skipped_ids"?}`` (`multissl.data.image_text.ImageTextCollator`), where rows not ``valid`` (bad
    images) take no part in the loss, the accuracies or the eval metrics."""

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
        self._losses: dict[tuple[int, int], MaskedContrastiveLoss] = {}

    def collator(self) -> Any:
        return self.train_collate

    def eval_collator(self) -> Any:
        return self.eval_collate

    def count(self, batch: dict[str, torch.Tensor]) -> dict[str, float | BadInputs]:
        """Usable rows, and the ids of the bad images (``skipped_images``: the trainer counts each file once)."""
        valid = batch.get("valid")
        samples = int(valid.sum()) if valid is not None else int(batch["images"].shape[0])
        return {"samples": samples, "skipped_images": BadInputs.of(batch)}

    def _loss_fn(self, distributed: bool) -> MaskedContrastiveLoss:
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        key = (rank, world)
        if key not in self._losses:
            self._losses[key] = MaskedContrastiveLoss(self.loss_cfg.kind, local_loss=self.loss_cfg.local_loss,
                                                      gather_with_grad=self.loss_cfg.gather_with_grad, rank=rank,
                                                      world_size=world)
        return self._losses[key]

    def compute(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        out = model(image=batch["images"], text=batch["texts"])
        image, text = out["image_features"], out["text_features"]
        n = image.shape[0]
        valid = batch.get("valid")
        valid = torch.ones(n, dtype=torch.bool, device=image.device) if valid is None else valid.to(image.device, torch.bool)
        # Negatives from all processes while training (every process steps together); eval batches
        # can be uneven across processes, so eval scores each batch on its own.
        distributed = model.training and torch.distributed.is_available() and torch.distributed.is_initialized()
        bias = out.get("logit_bias") if self.loss_cfg.kind == "siglip" else None
        total, count = self._loss_fn(distributed).sums(image, text, out["logit_scale"], bias, valid)
        with torch.no_grad():
            logits = (image @ text.T).float()
            target = torch.arange(n, device=logits.device)
            i2t = ((logits.masked_fill(~valid[None, :], MASKED).argmax(1) == target) & valid).float().sum()
            t2i = ((logits.masked_fill(~valid[:, None], MASKED).argmax(0) == target) & valid).float().sum()
        return {
            "loss": Mean(total, count),
            "batch_i2t_accuracy": Mean(i2t, count),
            "batch_t2i_accuracy": Mean(t2i, count),
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
        return self._embed(model, rows)[:3]

    def _embed(self, model: nn.Module, rows: list[dict[str, Any]]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """`embed`'s tensors and the number of rows whose image could not be used."""
        device = next(model.parameters()).device
        images, texts, labels = [], [], []
        skipped = 0
        for start in range(0, len(rows), self.eval_cfg.batch_size):
            batch = self.eval_collate(rows[start : start + self.eval_cfg.batch_size], torch.Generator().manual_seed(0))
            keep = batch["valid"] if "valid" in batch else torch.ones(len(batch["images"]), dtype=torch.bool)
            skipped += int((~keep).sum())
            if not keep.any():
                continue
            images.append(model.encode_image(batch["images"][keep].to(device), normalize=True).float().cpu())
            texts.append(model.encode_text(batch["texts"][keep].to(device), normalize=True).float().cpu())
            labels.append(batch["labels"][keep])
        if not images:
            return torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), skipped
        return torch.cat(images), torch.cat(texts), torch.cat(labels), skipped

    def on_evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Retrieval recall both ways on held-out pairs, and zero-shot accuracy when they have labels;
        ``skipped_images``: how many of the held-out images scored (the first ``eval.max_images``) were bad."""
        if self.eval_data is None or not hasattr(self.eval_data, "__len__") or len(self.eval_data) == 0:
            return {}
        from multissl.training.loader import rows as read_rows

        was_training = model.training
        model.eval()
        try:
            count = min(len(self.eval_data), self.eval_cfg.max_images)
            image, text, labels, skipped = self._embed(model, read_rows(self.eval_data.data, list(range(count))))
            metrics: dict[str, Any] = {"skipped_images": skipped} if skipped else {}
            if len(image) == 0:  # every held-out image was bad: nothing to score
                return metrics
            sim = image @ text.T
            metrics["retrieval_chance"] = 1.0 / len(image)
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
