"""Layer-wise learning-rate decay for fine-tuning a ViT (BEiT, Bao et al. 2021; the fine-tuning
recipe of MAE, He et al. 2021): layer ``i`` of ``L`` trains at ``lr x decay^(L + 1 - i)``, the patch
embedding and class token (layer 0) slowest, the head (layer ``L + 1``) at the full rate. The
pretrained early layers move little; the new head and the last layers adapt.

Layers are found by name, for transformers' ViT family (``layers.N`` in transformers 5,
``encoder.layer.N`` before: ViT, DeiT, DINOv2, an MAE's re-saved encoder) and timm's (``blocks.N``).
"""

from __future__ import annotations

import re

from torch import nn

from multissl.errors import ConfigError

LAYER = re.compile(r"(?:^|\.)(?:layers|layer|blocks)\.(\d+)\.")
EMBEDDING = ("embeddings.", "patch_embed.", "cls_token", "pos_embed", "reg_token", "dist_token", "mask_token")


def layer_of(name: str, depth: int) -> int:
    """0 for the embeddings, ``N + 1`` for layer ``N``, ``depth + 1`` for the rest (final norm, pooler, head)."""
    match = LAYER.search(name)
    if match:
        return int(match.group(1)) + 1
    if any(part in name for part in EMBEDDING):
        return 0
    return depth + 1


def layer_decay_multipliers(model: nn.Module, decay: float) -> list[tuple[float, list[nn.Parameter]]]:
    """``(lr multiplier, parameters)`` per layer, embeddings first; trainable parameters only."""
    if not 0.0 < decay <= 1.0:
        raise ConfigError(f"model.layer_decay must be in (0, 1], got {decay}")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    found = [int(m.group(1)) for name, _ in named if (m := LAYER.search(name))]
    if not found:
        raise ConfigError(f"model.layer_decay: {type(model).__name__} has no trainable ViT layers (layers.N, layer.N or "
                          "blocks.N) to decay by; leave it at 1.0 for this backbone")
    depth = max(found) + 1
    layers: dict[int, list[nn.Parameter]] = {}
    for name, p in named:
        layers.setdefault(layer_of(name, depth), []).append(p)
    return [(decay ** (depth + 1 - i), params) for i, params in sorted(layers.items())]
