"""Frozen features of encoders: one vector per example, for probes, kNN monitors and objectives'
``features`` (text: mean over non-pad tokens of the last hidden state; audio: over valid frames;
images: open_clip's ``encode_image``, a timm backbone's pooled output, or the mean of a transformers
ViT's patch tokens). Nothing here consumes torch's global random state."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and numpy load inside the functions: importing this module stays instant
    import numpy as np
    import torch
    from torch import nn


def _unwrap(model: nn.Module) -> nn.Module:
    """The user-facing model inside training wrappers: DDP's ``module``, torch.compile's ``_orig_mod``,
    and the MLM recipe's ``MaskedPositionsOnly`` (``mlm``)."""
    from torch import nn

    for attr in ("module", "_orig_mod", "mlm"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return _unwrap(inner)
    return model


def _encoder(model: nn.Module) -> nn.Module:
    """A transformers model's encoder without task head (``*ForMaskedLM`` -> ``BertModel``,
    ``Wav2Vec2ForPreTraining`` -> ``Wav2Vec2Model``); an encoder is its own ``base_model``."""
    model = _unwrap(model)
    return getattr(model, "base_model", model)


def _device_of(model: nn.Module) -> torch.device:
    import torch

    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _batches_by_length(lengths: Sequence[int], batch_size: int) -> Iterator[np.ndarray]:
    """Index batches of similar lengths (longest first): little padding, and with a group-norm audio
    encoder (which is fed no mask) a feature barely depends on its batch-mates."""
    import numpy as np

    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).float().cpu()


def _in_order(parts: list[tuple[np.ndarray, torch.Tensor]], n: int) -> torch.Tensor:
    """Reassemble per-batch features (computed in length order) in the examples' order."""
    import torch

    if not parts:
        return torch.zeros(0, 0)
    out = torch.zeros(n, parts[0][1].shape[1])
    for idx, feats in parts:
        out[torch.from_numpy(idx)] = feats
    return out


def _position_limit(config: Any) -> int | None:
    """How many tokens the model's position table holds (RoBERTa-style tables start after the pad id)."""
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if limit and getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return limit


def text_features(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int,
                  device: torch.device | str | None = None, max_length: int = 128) -> torch.Tensor:
    """``(len(texts), hidden)``: the mean over non-pad tokens of the encoder's last hidden state.

    Padding is done here (right side, attention mask), so tokenizers without a pad token (GPT-2
    style) work unchanged; texts are cut to what both the tokenizer and the position table allow.
    """
    import torch

    encoder = _encoder(model)
    device = torch.device(device) if device is not None else _device_of(encoder)
    limits = [max_length, getattr(tokenizer, "model_max_length", None), _position_limit(encoder.config)]
    length = min(v for v in limits if isinstance(v, int) and v > 0)
    ids = tokenizer(list(texts), truncation=True, max_length=length)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    parts = []
    with torch.no_grad():
        for idx in _batches_by_length([len(x) for x in ids], batch_size):
            longest = max(len(ids[i]) for i in idx)
            batch = torch.full((len(idx), longest), pad, dtype=torch.long)
            mask = torch.zeros(len(idx), longest, dtype=torch.long)
            for row, i in enumerate(idx):
                batch[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            hidden = encoder(input_ids=batch.to(device), attention_mask=mask.to(device)).last_hidden_state
            parts.append((idx, _masked_mean(hidden, mask.to(device))))
    return _in_order(parts, len(ids))


def _waveform(source: np.ndarray | str | Path, sample_rate: int, normalize: bool, max_samples: int) -> np.ndarray:
    """Decoded (when a path), cut to ``max_samples``, and normalised to zero mean / unit variance
    as the pretraining collator and Wav2Vec2FeatureExtractor do."""
    import numpy as np

    from multissl.data.audio import load_audio

    x = source if isinstance(source, np.ndarray) else load_audio(source, sample_rate)
    x = np.asarray(x, dtype=np.float64)[:max_samples]
    if normalize:
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    return x.astype(np.float32)


def audio_features(model: nn.Module, waveforms: Sequence[np.ndarray | str | Path], batch_size: int,
                   device: torch.device | str | None = None, *, sample_rate: int = 16000, normalize: bool = True,
                   max_seconds: float = 10.0, attention_mask: bool | None = None) -> torch.Tensor:
    """``(len(waveforms), hidden)``: the mean over valid frames of a wav2vec2-style encoder's last
    hidden state; ``waveforms`` are arrays at ``sample_rate`` or audio file paths.

    ``attention_mask=None`` follows transformers' advice: a mask for layer-norm feature encoders,
    zero padding without a mask for group-norm ones (BASE). Valid frames come from the model's own
    ``_get_feat_extract_output_lengths``.
    """
    import torch

    encoder = _encoder(model)
    device = torch.device(device) if device is not None else _device_of(encoder)
    dtype = next((p.dtype for p in encoder.parameters()), torch.float32)
    use_mask = encoder.config.feat_extract_norm == "layer" if attention_mask is None else attention_mask
    waves = [_waveform(w, sample_rate, normalize, int(max_seconds * sample_rate)) for w in waveforms]
    parts = []
    with torch.no_grad():
        for idx in _batches_by_length([len(w) for w in waves], batch_size):
            lengths = torch.tensor([len(waves[i]) for i in idx])
            values = torch.zeros(len(idx), int(lengths.max()))
            for row, i in enumerate(idx):
                values[row, : len(waves[i])] = torch.from_numpy(waves[i])
            mask = (torch.arange(values.shape[1])[None, :] < lengths[:, None]).long().to(device)
            hidden = encoder(values.to(device, dtype), attention_mask=mask if use_mask else None).last_hidden_state
            frames = encoder._get_feat_extract_output_lengths(lengths).to(device)
            valid = torch.arange(hidden.shape[1], device=device)[None, :] < frames[:, None]
            parts.append((idx, _masked_mean(hidden, valid)))
    return _in_order(parts, len(waves))


def image_features(model: nn.Module, preprocess: Callable[[Any], torch.Tensor], images: Sequence[Any],
                   batch_size: int, device: torch.device | str | None = None, pooled: bool = False) -> torch.Tensor:
    """``(len(images), dim)`` of PIL images or image paths after the model's own eval transform:
    open_clip's ``encode_image`` (unnormalised), or with ``pooled`` the model's output itself (a timm
    backbone built with ``num_classes=0`` returns its pooled features)."""
    import torch

    from multissl.data.images import load_image, to_rgb

    model = _unwrap(model)
    device = torch.device(device) if device is not None else _device_of(model)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)

    def load(item: Any) -> torch.Tensor:  # files decode as the training data does (CMYK, 16-bit, alpha)
        return preprocess(load_image(item, str(item)) if isinstance(item, (str, Path)) else to_rgb(item))

    feats = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.stack([load(x) for x in images[start : start + batch_size]])
            batch = batch.to(device, dtype)
            feats.append((model(batch) if pooled else model.encode_image(batch)).float().cpu())
    return torch.cat(feats) if feats else torch.zeros(0, 0)


def _rgb(item: Any) -> Any:
    """A PIL image or a path, as an RGB PIL image; files decode as the training data does (CMYK, 16-bit, alpha)."""
    from multissl.data.images import load_image, to_rgb

    return load_image(item, str(item)) if isinstance(item, (str, Path)) else to_rgb(item)


def vit_features(model: nn.Module, processor: Any, images: Sequence[Any], batch_size: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """``(len(images), hidden)`` of PIL images or image paths through a transformers ViT-style encoder
    (ViT, DeiT, DINOv2; a ``*ForImageClassification`` gives its encoder) after its own image processor:
    the mean of the patch tokens of the last hidden state.

    Not the CLS token nor ``pooler_output``: a masked autoencoder's loss reads only the reconstructed
    patches, so its CLS token is shaped at most indirectly, and MAE's fine-tuning (``global_pool``) reads
    the mean of the patch tokens, as timm's ``global_pool="avg"`` does. The tokens in front of the patches
    (CLS, DeiT's distillation token, registers) are counted from the patch grid and all left out.
    """
    import torch

    encoder = _encoder(model)
    device = torch.device(device) if device is not None else _device_of(encoder)
    dtype = next((p.dtype for p in encoder.parameters()), torch.float32)
    patch = encoder.config.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    feats = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = processor(images=[_rgb(x) for x in images[start : start + batch_size]],
                               return_tensors="pt")["pixel_values"]
            hidden = encoder(pixel_values=pixels.to(device, dtype)).last_hidden_state
            patches = (pixels.shape[-2] // ph) * (pixels.shape[-1] // pw)
            feats.append(hidden[:, hidden.shape[1] - patches :].mean(1).float().cpu())
    return torch.cat(feats) if feats else torch.zeros(0, 0)
