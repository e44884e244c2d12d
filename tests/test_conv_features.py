"""The feature encoder's faster layout: the same function, gradients and saved model as transformers' own."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from multissl.models.conv_features import activation_before_transpose


def _tiny(norm: str = "layer"):
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

    torch.manual_seed(0)
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16,) * 7, feat_extract_norm=norm, do_stable_layer_norm=norm == "layer",
                            num_codevectors_per_group=8, codevector_dim=32, proj_codevector_dim=32,
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=16)
    return Wav2Vec2ForPreTraining(config).eval()


def test_the_layer_norm_conv_layers_give_the_same_features_and_gradients() -> None:
    stock = _tiny()
    fast = activation_before_transpose(copy.deepcopy(stock))
    layers = list(fast.wav2vec2.feature_extractor.conv_layers)
    assert all(type(m).__name__ == "ContiguousWav2Vec2LayerNormConvLayer" for m in layers)
    assert all(type(m).__name__ == "Wav2Vec2LayerNormConvLayer" for m in stock.wav2vec2.feature_extractor.conv_layers)
    assert activation_before_transpose(fast) is fast and type(layers[0]) is type(fast.wav2vec2.feature_extractor.conv_layers[0])
    x = torch.randn(3, 4000)
    outs = []
    for model in (stock, fast):
        model.zero_grad()
        features = model.wav2vec2.feature_extractor(x)
        (features * torch.linspace(-1, 1, features.shape[-1])).sum().backward()
        outs.append((features, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    # the same function; float rounding may differ, as a convolution's kernel can change with its input's layout
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    assert outs[0][1].keys() == outs[1][1].keys() and len(outs[0][1]) == 7 * 3  # conv weight, norm weight and bias
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-4, atol=2e-5, msg=name)  # sums of 10^4 terms


def test_a_saved_model_is_transformers_own_with_the_same_outputs(tmp_path: Path) -> None:
    from transformers import Wav2Vec2Model

    fast = activation_before_transpose(_tiny())
    fast.save_pretrained(tmp_path)
    loaded = Wav2Vec2Model.from_pretrained(tmp_path).eval()
    assert type(loaded.feature_extractor.conv_layers[0]).__name__ == "Wav2Vec2LayerNormConvLayer"
    x = torch.randn(2, 3000)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).last_hidden_state, fast.wav2vec2(x).last_hidden_state)


@pytest.mark.parametrize("norm", ["group"])
def test_other_feature_encoders_are_left_alone(norm: str) -> None:
    model = _tiny(norm)
    before = [type(m) for m in model.modules()]
    assert [type(m) for m in activation_before_transpose(model).modules()] == before


def test_every_speech_recipe_trains_the_faster_layout_and_hands_its_encoder_a_copy(tmp_path: Path) -> None:
    """(The copy is what lets the encoder zero padded frames in place under FSDP: tests/test_encoder_input.py.)"""
    from multissl.data.labels import LabelMap
    from multissl.objectives.audio_classification import AudioClassifierModelConfig, build_audio_classifier
    from multissl.objectives.ctc import CTCModelConfig, build_ctc_model
    from multissl.objectives.wav2vec2 import Wav2Vec2LossConfig, Wav2Vec2ModelConfig, build_wav2vec2

    pretraining = build_wav2vec2(Wav2Vec2ModelConfig(size="tiny"), Wav2Vec2LossConfig())
    pretraining.save_pretrained(tmp_path / "pretrained")
    models = [pretraining,
              build_wav2vec2(Wav2Vec2ModelConfig(size="tiny", init_from=str(tmp_path / "pretrained")), Wav2Vec2LossConfig()),
              build_ctc_model(CTCModelConfig(size="tiny"), {"<pad>": 0, "|": 1, "a": 2})[0],
              build_audio_classifier(AudioClassifierModelConfig(size="tiny"), LabelMap(("yes", "no")))[0]]
    for model in models:
        names = {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("ConvLayer")}
        assert names == {"ContiguousWav2Vec2LayerNormConvLayer"}, (type(model).__name__, names)
        assert model.base_model.encoder._multissl_copies_input, type(model).__name__
