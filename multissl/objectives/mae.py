"""Masked autoencoders (He et al. 2021) over transformers' ``ViTMAEForPreTraining``: hide 75% of the
patches at random, encode the visible ones, and let a light decoder predict the hidden patches'
pixels (each patch normalised by its own mean and variance); the loss is on hidden patches only.

* The mask noise is drawn in the collator from the batch's seeded generator and handed to the
  model (``noise=``), so resume and the DataLoader worker count never change which patches hide.
* Bad images are counted skips (each file once, across a resume); a batch whose images are all bad
  trains nothing (its step is not taken) and, under several processes, still joins DDP's collectives.
* Eval: the same loss on held-out images (with seeded masks), the online kNN / linear probe of the
  image family on the encoder's features, and, at export, ``reconstructions.png`` beside the model
  card: held-out images, their masked input and the reconstruction.
* Output: the encoder as a plain transformers ``ViTModel`` + ``ViTImageProcessor``
  (`multissl.models.vit`): ``AutoModel`` and ``pipeline("image-feature-extraction")`` load it, and
  ``multissl finetune image-classification`` fine-tunes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from multissl.data.images import PixelPipeline, decode_and_transform, skipped_ids
from multissl.data.views import AugmentConfig, view_transform
from multissl.errors import ConfigError
from multissl.losses.masked_pixels import masked_patch_mse
from multissl.metrics import Mean
from multissl.models.vit import save_vit, vit_from_mae, vit_image_processor
from multissl.training.distributed import StepRows, kept_buffers
from multissl.training.objective import ModelCardInfo, Objective, ParamGroup, StepOutput, TrainContext
from multissl.training.skips import BadInputs

PREVIEW_FILE = "reconstructions.png"
PREVIEW_IMAGES = 8


@dataclass
class MAEModelConfig:
    """The ViT encoder and its decoder: ``ViTMAEConfig`` arguments over transformers' defaults (the
    paper's ViT-B/16 with an 8-block, 512-wide decoder). The input side is ``augment.size``."""

    size: str = "base"
    """A label for the model card (tiny, small, base)."""
    config: dict[str, Any] = field(default_factory=dict)
    """e.g. hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, patch_size,
    decoder_hidden_size, decoder_num_hidden_layers, decoder_num_attention_heads, decoder_intermediate_size."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """The attention kernel while pretraining (the same arithmetic). On a GPU, SDPA's fused kernels
    win; on CPU at the tiny preset's 17 visible and 65 decoder tokens, the plain matmul-softmax path
    is faster than torch's CPU flash kernel (the tiny preset uses it; see the README's benchmark)."""

    def __post_init__(self) -> None:
        for key, where in (("image_size", "augment.size"), ("mask_ratio", "loss.mask_ratio"),
                           ("norm_pix_loss", "loss.norm_pix")):
            if key in self.config:
                raise ConfigError(f"model.config.{key}: set {where} instead (one place for it)")


@dataclass
class MAELossConfig:
    mask_ratio: float = 0.75
    """Share of the patches hidden from the encoder (the paper's 75%)."""
    norm_pix: bool = True
    """Targets are each patch's pixels normalised by the patch's mean and variance."""

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"loss.mask_ratio must be in (0, 1), got {self.mask_ratio}")


def build_mae(model: MAEModelConfig, loss: MAELossConfig, image_size: int) -> nn.Module:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    known = set(ViTMAEConfig().to_dict())
    unknown = sorted(set(model.config) - known)
    if unknown:  # PretrainedConfig keeps any keyword silently: a typo would change nothing
        import difflib

        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"model.config: unknown ViTMAEConfig key {unknown[0]!r}{hint}")
    try:
        config = ViTMAEConfig(**model.config, image_size=image_size, mask_ratio=loss.mask_ratio,
                              norm_pix_loss=loss.norm_pix, attn_implementation=model.attn_implementation)
    except TypeError as err:
        raise ConfigError(f"model.config: {err}") from None
    if image_size % config.patch_size:
        raise ConfigError(f"augment.size={image_size} is not a multiple of model.config.patch_size={config.patch_size}")
    if config.hidden_size % config.num_attention_heads or config.decoder_hidden_size % config.decoder_num_attention_heads:
        raise ConfigError("model.config: hidden sizes must be multiples of their attention heads "
                          f"(encoder {config.hidden_size}/{config.num_attention_heads}, "
                          f"decoder {config.decoder_hidden_size}/{config.decoder_num_attention_heads})")
    return ViTMAEForPreTraining(config)


def eval_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> PixelPipeline:
    """Held-out images: resized whole to ``size`` (as the saved image processor does), normalised."""
    from torchvision.transforms import v2

    return PixelPipeline([v2.Resize((size, size), antialias=True)], mean, std)


@dataclass
class MaskedImageCollator:
    """``(samples, generator) -> {"pixel_values", "noise", "labels", "skipped", "skipped_ids"}``: images
    decoded and augmented in the worker under RNGs seeded from the batch generator, and the per-patch
    mask noise drawn from the same generator (the lowest ``1 - mask_ratio`` of each row stay visible).
    Bad images are left out and counted (``skipped_ids`` naming them for the trainer's distinct count); a batch
    whose images are all bad has no rows."""

    transform: Any
    num_patches: int
    on_bad_image: str = "skip"
    max_image_pixels: int = 64_000_000

    def __call__(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, Any]:
        kept, (pixels,), skipped = decode_and_transform(samples, [self.transform], generator, self.on_bad_image,
                                                        self.max_image_pixels, allow_empty=True)
        noise = torch.rand((len(kept), self.num_patches), generator=generator)
        labels = torch.tensor([int(sample.get("label", -1)) for sample in kept], dtype=torch.long)
        kept_ids = {id(sample) for sample in kept}
        bad = [str(sample["path"]) for sample in samples if id(sample) not in kept_ids]
        return {"pixel_values": pixels, "noise": noise, "labels": labels, "skipped": skipped,
                "skipped_ids": skipped_ids(bad)}


class MAE(Objective):
    """Masked-patch reconstruction. A step whose batches had no usable image on any process is not
    taken (its gradients are dropped: AdamW's moments, step count and weight decay stay as they were)."""

    name = "mae"
    modality = "image"

    def __init__(self, model: MAEModelConfig, loss: MAELossConfig, augment: AugmentConfig,
                 on_bad_image: str = "skip", max_image_pixels: int = 64_000_000, **_: Any) -> None:
        self.model_cfg, self.loss_cfg, self.augment = model, loss, augment
        self.model = build_mae(model, loss, augment.size)
        self.processor = vit_image_processor(augment.size, augment.mean, augment.std)
        patches = self.model.vit.embeddings.patch_embeddings.num_patches
        self._train = MaskedImageCollator(view_transform(augment), patches, on_bad_image, max_image_pixels)
        self._eval = MaskedImageCollator(eval_transform(augment.size, augment.mean, augment.std), patches,
                                         on_bad_image, max_image_pixels)
        self.preview_rows: list[dict[str, Any]] = []
        self.step_rows = StepRows()
        self.device = torch.device("cpu")

    def show_held_out(self, held_out: Any) -> None:
        """Keep the first held-out images for the reconstruction picture drawn at export."""
        from multissl.training.loader import rows

        if held_out is None:
            return
        if hasattr(held_out, "data"):  # spread over the set: a folder's listing is sorted by class
            n = len(held_out)
            picks = sorted({i * n // PREVIEW_IMAGES for i in range(PREVIEW_IMAGES)}) if n else []
            self.preview_rows = rows(held_out.data, picks)
        else:
            self.preview_rows = list(islice(iter(held_out), PREVIEW_IMAGES))

    # ------------------------------------------------------------------ the objective
    def collator(self) -> MaskedImageCollator:
        return self._train

    def eval_collator(self) -> MaskedImageCollator:
        return self._eval

    def count(self, batch: dict[str, Any]) -> dict[str, float | BadInputs]:
        """Usable images, and the ids of the bad ones (``skipped_images``: the trainer counts each file once)."""
        return {"samples": int(batch["labels"].shape[0]), "skipped_images": BadInputs.of(batch)}

    def setup(self, context: TrainContext) -> None:
        self.device = context.device

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        """The loss over hidden patches. A batch of no images (all bad) scores nothing: a ViT cannot
        forward zero rows, so one blank stand-in image is forwarded (its output cut to none, the
        model's buffers put back) and the loss, 0 over no patches, still depends on every parameter,
        as DDP needs of every process."""
        pixels, noise = batch["pixel_values"], batch["noise"]
        rows = pixels.shape[0]
        if model.training:
            self.step_rows.add(rows)
        if rows == 0:
            with kept_buffers(model):
                out = model(pixel_values=pixels.new_zeros((1, *pixels.shape[1:])), noise=noise.new_zeros((1, noise.shape[1])))
            loss = masked_patch_mse(out.logits[:0], model.patchify(pixels), out.mask[:0], self.loss_cfg.norm_pix)
        else:
            # ViTMAEForPreTraining computes `masked_patch_mse` itself (its config carries norm_pix and
            # the mask ratio; a test holds the two equal): computing it again cost 3% of a step
            loss = model(pixel_values=pixels, noise=noise).loss
        return {"loss": Mean(loss * rows, rows)}

    def before_optimizer_step(self, model: nn.Module, step: int) -> None:
        if self.step_rows.none_anywhere(self.device):
            StepRows.drop_gradients(model)

    def on_step_end(self, step: int) -> dict[str, float]:
        self.step_rows.reset()
        return {}

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        """The class and mask tokens are not decayed (as in the paper's code), like biases and norms."""
        tokens = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(("cls_token", "mask_token"))]
        ids = {id(p) for p in tokens}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return [ParamGroup(rest), ParamGroup(tokens, name="tokens", wd_multiplier=0.0)]

    # ------------------------------------------------------------------ output
    def export(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def features(self, model: nn.Module, inputs: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """The saved encoder's features (mean of its patch tokens on whole images), as users get them."""
        from multissl.models.features import vit_features

        return vit_features(vit_from_mae(self.export(model)), self.processor, inputs, batch_size)

    def save_pretrained(self, model: nn.Module, output_dir: Path) -> None:
        save_vit(vit_from_mae(model), self.processor, output_dir)
        grid = reconstruction_rows(model, self._eval, self.preview_rows, self.augment) if self.preview_rows else []
        if grid and grid[0]:  # not when every preview image was bad
            from multissl.plots import image_grid

            image_grid(grid, output_dir / PREVIEW_FILE)

    def model_card(self) -> ModelCardInfo:
        c = self.model.config
        return ModelCardInfo(
            method=self.name, arch=f"ViT ({c.num_hidden_layers} layers, width {c.hidden_size}, patch {c.patch_size})",
            size=self.model_cfg.size, parameters=sum(p.numel() for p in self.model.vit.parameters()),
            library_name="transformers", pipeline_tag="image-feature-extraction", auto_class="AutoModel",
            card_metrics=("loss",),
            figures=((PREVIEW_FILE, "Held-out reconstructions: originals (top), the patches the encoder sees "
                                    "(middle) and the reconstruction with predicted pixels where patches were hidden (bottom)"),),
            usage=("from PIL import Image\n"
                   "from transformers import AutoImageProcessor, AutoModel\n\n"
                   'processor = AutoImageProcessor.from_pretrained("{repo}")\n'
                   'model = AutoModel.from_pretrained("{repo}").eval()\n'
                   'inputs = processor(images=Image.open("image.png").convert("RGB"), return_tensors="pt")\n'
                   "features = model(**inputs).last_hidden_state[:, 1:].mean(1)  # mean of the patch tokens\n"
                   '# or: transformers.pipeline("image-feature-extraction", model="{repo}")'))


@torch.no_grad()
def reconstruction_rows(model: nn.Module, collate: MaskedImageCollator, samples: list[dict[str, Any]],
                        augment: AugmentConfig) -> list[list[torch.Tensor]]:
    """Three rows, ``[originals, masked inputs, reconstructions]``, of (3, H, W) tensors in [0, 1]; the
    reconstruction keeps visible patches and, where patches were hidden, the predicted pixels
    (un-normalised with each true patch's own mean and variance when the targets were normalised);
    bad images are left out (none usable: three empty rows)."""
    batch = collate(samples, torch.Generator().manual_seed(0))
    if len(batch["pixel_values"]) == 0:
        return [[], [], []]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        pixels = batch["pixel_values"].to(device)
        out = model(pixel_values=pixels, noise=batch["noise"].to(device))
        patches = model.patchify(pixels)
        predicted = out.logits.float()
        if model.config.norm_pix_loss:
            mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
            predicted = predicted * (var + 1e-6).sqrt() + mean
        hidden = out.mask.unsqueeze(-1).bool()
        masked = model.unpatchify(torch.where(hidden, torch.full_like(patches, float("nan")), patches))
        recon = model.unpatchify(torch.where(hidden, predicted, patches))
    finally:
        model.train(was_training)
    mean_t = torch.tensor(augment.mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(augment.std, device=device).view(1, 3, 1, 1)

    def to_unit(x: torch.Tensor) -> torch.Tensor:  # hidden patches (NaN) are drawn grey
        return torch.nan_to_num((x * std_t + mean_t).clamp(0, 1), nan=0.5).cpu()

    return [list(to_unit(pixels)), list(to_unit(masked)), list(to_unit(recon))]

