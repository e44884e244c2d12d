"""Layer-wise lr decay: which layer each ViT parameter is in (transformers' and timm's names), the
multipliers, and a clear error for a backbone without ViT layers."""

from __future__ import annotations

import pytest

from multissl.errors import ConfigError
from multissl.models.layer_decay import layer_decay_multipliers, layer_of


@pytest.mark.parametrize("name, layer", [
    ("net.vit.embeddings.patch_embeddings.projection.weight", 0), ("net.vit.embeddings.cls_token", 0),
    ("net.vit.layers.0.attention.q_proj.weight", 1), ("net.vit.layers.11.mlp.fc2.bias", 12),
    ("net.dinov2.encoder.layer.5.attention.attention.query.weight", 6),
    ("net.vit.layernorm.weight", 13), ("net.classifier.weight", 13),
    ("net.patch_embed.proj.weight", 0), ("net.pos_embed", 0), ("net.cls_token", 0), ("net.blocks.3.mlp.fc1.weight", 4),
    ("net.norm.weight", 13), ("net.head.weight", 13),
])
def test_each_parameter_is_in_its_layer(name: str, layer: int) -> None:
    assert layer_of(name, depth=12) == layer


def test_multipliers_fall_by_the_decay_per_layer_towards_the_input() -> None:
    from transformers import ViTConfig, ViTForImageClassification

    net = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=3,
                                              num_attention_heads=2, intermediate_size=32, num_labels=4))
    groups = layer_decay_multipliers(net, 0.5)
    assert [m for m, _ in groups] == [0.5**4, 0.5**3, 0.5**2, 0.5, 1.0]
    by_id = {id(p): m for m, params in groups for p in params}
    assert len(by_id) == sum(1 for _ in net.parameters()), "every parameter in exactly one group"
    assert by_id[id(net.vit.embeddings.cls_token)] == 0.5**4 and by_id[id(net.classifier.weight)] == 1.0
    assert all(by_id[id(p)] == 0.5 for p in net.vit.layers[2].parameters())


def test_timm_vits_decay_too_and_frozen_or_convolutional_backbones_are_refused() -> None:
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=3)
    assert [m for m, _ in layer_decay_multipliers(vit, 0.75)] == pytest.approx([0.75**3, 0.75**2, 0.75, 1.0])
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with pytest.raises(ConfigError, match="resnet|ResNet"):
        layer_decay_multipliers(resnet, 0.75)
    vit.requires_grad_(False)
    vit.head.requires_grad_(True)
    with pytest.raises(ConfigError, match="no trainable ViT layers"):
        layer_decay_multipliers(vit, 0.75)
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\]"):
        layer_decay_multipliers(vit, 1.5)
