"""transformers ViT encoders as users load them: an MAE's encoder re-saved as a plain ``ViTModel``
(+ ``ViTImageProcessor``), so ``AutoModel`` and ``pipeline("image-feature-extraction")`` give the
features of the whole, unmasked image with no multissl code.

A ``ViTMAEModel`` would not do: it hides ``config.mask_ratio`` of the patches at every forward, and
even at ratio 0 it shuffles them. Its layers are ViT's, so its weights load into ``ViTModel`` as
they are; the fixed sine-cosine position table becomes ViT's position embeddings. ViT's pooler
(dense + tanh on the CLS token) has no MAE counterpart: it is saved as the identity with
``pooler_act="linear"``, so ``pooler_output`` is the CLS token and nothing loads at random.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

ENCODER_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps",
                "image_size", "patch_size", "num_channels", "qkv_bias")


def vit_from_mae(mae: nn.Module) -> nn.Module:
    """A ``ViTModel`` (eval mode, on the MAE's device) computing the MAE encoder on unmasked images."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(**{k: getattr(mae.config, k) for k in ENCODER_KEYS}, pooler_act="linear")
    vit = ViTModel(config)
    state: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in mae.vit.state_dict().items()}
    width = config.hidden_size
    state["pooler.dense.weight"] = torch.eye(width, dtype=state["layernorm.weight"].dtype)
    state["pooler.dense.bias"] = torch.zeros(width, dtype=state["layernorm.weight"].dtype)
    vit.load_state_dict(state, strict=True)
    device = next(mae.parameters()).device
    return vit.to(device).eval()


def vit_image_processor(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """The eval preprocessing users get from ``AutoImageProcessor``: resize to ``size`` (bilinear),
    scale to [0, 1], normalise with the training mean and std."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": size, "width": size}, resample=2, image_mean=list(mean),
                             image_std=list(std), do_resize=True, do_rescale=True, do_normalize=True)


def save_vit(vit: nn.Module, processor: Any, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    vit.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)
