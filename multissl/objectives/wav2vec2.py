"""wav2vec 2.0 contrastive pretraining over `transformers`' ``Wav2Vec2ForPreTraining``.

What the model lacks and this module adds: span masks and distractor sampling done in the
collator (vectorised, seeded per batch), the annealed Gumbel temperature kept in the checkpoint,
the loss normalised by masked frames over all processes, the feature-encoder gradient scale and
feature penalty of the paper, contrastive accuracy and a codebook-collapse guard.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from multissl.data.audio import AudioSkips
from multissl.errors import ConfigError, TrainingError, first_line
from multissl.metrics import Mean
from multissl.models.conv_features import activation_before_transpose
from multissl.models.encoder_input import encoder_gets_a_copy
from multissl.training.objective import ModelCardInfo, Objective, TrainContext

# hidden, layers, heads, ffn, conv channels, codevectors per group. tiny's codebook is small (2 x 16):
# with 2 x 64 its codes change almost every frame and stay unpredictable for a model this size.
W2V_SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (64, 2, 2, 128, 64, 16),
    "small": (384, 6, 6, 1536, 256, 160),
    "base": (768, 12, 12, 3072, 512, 320),
}
FINETUNE_MASK_TIME_PROB = 0.05


@dataclass
class Wav2Vec2ModelConfig:
    size: Literal["tiny", "small", "base"] = "tiny"
    """base is the paper's BASE model (95M parameters)."""
    hidden_size: int = 0
    num_layers: int = 0
    conv_dim: int = 0
    num_codevectors_per_group: int = 0
    num_codevector_groups: int = 2
    dropout: float = 0.1
    extractor_norm: Literal["", "group", "layer"] = ""
    """Feature-encoder normalisation: "group" (the paper's BASE: group norm in the first conv layer,
    post-norm transformer) or "layer" (its LARGE: layer norm everywhere, pre-norm transformer, which
    trains stably at any size); "" = group for base, layer for tiny and small."""
    init_from: str = ""
    """Continue pretraining from a local save_pretrained folder or Hub id."""


@dataclass
class Wav2Vec2LossConfig:
    """fairseq's wav2vec 2.0 BASE defaults."""

    mask_prob: float = 0.65
    """Share of frames that start a masked span (0.05 is the fine-tuning value, not this one)."""
    mask_length: int = 10
    num_negatives: int = 100
    logit_temperature: float = 0.1
    diversity_weight: float = 0.1
    feature_penalty_weight: float | None = None
    """L2 penalty on the feature encoder's output; None = fairseq's pairing: 10 with the group-norm
    encoder (BASE), 0 with the layer-norm one (LARGE; on small models a penalty of 10 outweighs the
    contrastive loss and nothing is learned)."""
    feature_grad_scale: float | None = None
    """Scale of the feature encoder's gradient; None = 0.1 with the group-norm encoder (BASE), 1.0 with
    the layer-norm one (LARGE)."""
    gumbel_start: float = 2.0
    gumbel_end: float = 0.5
    gumbel_decay: float = 0.999995
    collapse_perplexity: float = 0.0
    """Warn when codevector perplexity falls below this after warm-up; 0 = 10% of the codebook."""
    collapse_patience: int = 5
    """Log intervals in a row with a collapsed codebook (or chance accuracy) before warning."""
    stop_on_collapse: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.mask_prob < 1:
            raise ConfigError(f"loss.mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.mask_prob <= FINETUNE_MASK_TIME_PROB:
            warnings.warn(
                f"loss.mask_prob={self.mask_prob} is the fine-tuning value; pretraining uses ~0.65 "
                "(too few masked frames gives the model little to predict)", stacklevel=2,
            )
        if self.mask_length < 1 or self.num_negatives < 1:
            raise ConfigError("loss.mask_length and loss.num_negatives must be >= 1")
        if not 0 < self.gumbel_end <= self.gumbel_start:
            raise ConfigError("need 0 < loss.gumbel_end <= loss.gumbel_start")


def conv_output_lengths(lengths: torch.Tensor, kernels: tuple[int, ...], strides: tuple[int, ...]) -> torch.Tensor:
    """Frames the convolutional feature encoder makes from ``lengths`` samples."""
    out = lengths.clone()
    for k, s in zip(kernels, strides):
        out = torch.div(out - k, s, rounding_mode="floor") + 1
    return out.clamp_min(0)


def span_masks(lengths: torch.Tensor, max_frames: int, prob: float, span: int, generator: torch.Generator,
               min_spans: int = 2) -> torch.Tensor:
    """Boolean ``(B, max_frames)`` masks of ``span``-long spans within each utterance's frames.

    As in fairseq: each utterance gets ``round(prob * L / span)`` span starts (stochastic rounding),
    drawn without replacement from positions where a whole span fits; spans may overlap, so the
    masked fraction is a little below ``prob`` x ``span`` / (1 + overlap).
    """
    batch = lengths.shape[0]
    fit = (lengths - span + 1).clamp_min(1)
    expected = prob * lengths.float() / span + torch.rand(batch, generator=generator)
    n_spans = torch.minimum(expected.floor().long().clamp_min(min_spans), fit)
    keys = torch.rand(batch, max_frames, generator=generator)
    pos = torch.arange(max_frames)
    keys[pos[None, :] >= fit[:, None]] = 2.0  # starts must leave room for the span
    rank = keys.argsort(dim=1).argsort(dim=1)
    starts = (rank < n_spans[:, None]).float()
    covered = nn.functional.conv1d(starts[:, None, :], torch.ones(1, 1, span), padding=span - 1)[:, 0, :max_frames]
    return (covered > 0) & (pos[None, :] < lengths[:, None])


def sample_negatives(mask: torch.Tensor, num_negatives: int, generator: torch.Generator) -> torch.Tensor:
    """``(B, T, K)`` flat indices into ``B*T`` of distractors for every masked frame.

    Distractors come from the other masked frames of the same utterance (never the frame itself,
    never padding). Unmasked frames get their own index (ignored by the loss).
    """
    batch, frames = mask.shape
    counts = mask.sum(1)
    if (counts < 2).any():
        raise ValueError("every utterance needs at least 2 masked frames to draw distractors")
    order = torch.argsort((~mask).float(), dim=1, stable=True)  # masked frame positions first, in order
    slot = torch.cumsum(mask.long(), 1) - 1  # a masked frame's index among its utterance's masked frames
    draw = torch.rand(batch, frames, num_negatives, generator=generator)
    pick = (draw * (counts[:, None, None] - 1).float()).long()  # 0 .. n-2
    pick = pick + (pick >= slot[:, :, None]).long()  # skip the positive itself
    frame = order.gather(1, pick.view(batch, -1)).view(batch, frames, num_negatives)
    own = torch.arange(frames)[None, :, None].expand(batch, frames, num_negatives)
    frame = torch.where(mask[:, :, None], frame, own)
    return frame + (torch.arange(batch) * frames)[:, None, None]


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def extractor_norm(cfg: Wav2Vec2ModelConfig) -> str:
    return cfg.extractor_norm or ("group" if cfg.size == "base" else "layer")


def build_wav2vec2(cfg: Wav2Vec2ModelConfig, loss: Wav2Vec2LossConfig) -> nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

    if cfg.init_from:
        try:
            return encoder_gets_a_copy(activation_before_transpose(Wav2Vec2ForPreTraining.from_pretrained(cfg.init_from)))
        except Exception as err:
            raise ConfigError(f"model.init_from={cfg.init_from!r}: cannot load ({first_line(err)})") from None
    h, layers, heads, ffn, conv, codevectors = W2V_SIZES[cfg.size]
    h, layers = cfg.hidden_size or h, cfg.num_layers or layers
    conv = cfg.conv_dim or conv
    codevectors = cfg.num_codevectors_per_group or codevectors
    norm = extractor_norm(cfg)
    config = Wav2Vec2Config(
        hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads if h % heads == 0 else 1,
        intermediate_size=ffn, conv_dim=(conv,) * 7, feat_extract_norm=norm, do_stable_layer_norm=norm == "layer",
        num_codevectors_per_group=codevectors, num_codevector_groups=cfg.num_codevector_groups,
        codevector_dim=h, proj_codevector_dim=h, num_negatives=loss.num_negatives,
        contrastive_logits_temperature=loss.logit_temperature, diversity_loss_weight=loss.diversity_weight,
        hidden_dropout=cfg.dropout, attention_dropout=cfg.dropout, activation_dropout=0.0, feat_proj_dropout=cfg.dropout,
        layerdrop=0.0, mask_time_prob=loss.mask_prob, mask_time_length=loss.mask_length,
        num_conv_pos_embeddings=16 if cfg.size == "tiny" else 128, num_conv_pos_embedding_groups=16 if h % 16 == 0 else 1,
    )
    return encoder_gets_a_copy(activation_before_transpose(Wav2Vec2ForPreTraining(config)))


@dataclass
class SpanMaskingCollator:
    """Audio batches with span masks over their frames and distractor indices (in workers, seeded)."""

    audio_collate: Any
    kernels: tuple[int, ...]
    strides: tuple[int, ...]
    mask_prob: float
    mask_length: int
    num_negatives: int

    def __call__(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = self.audio_collate(samples, generator)
        frames = conv_output_lengths(batch["attention_mask"].sum(1), self.kernels, self.strides)
        max_frames = int(conv_output_lengths(torch.tensor([batch["input_values"].shape[1]]), self.kernels, self.strides)[0])
        mask = span_masks(frames, max_frames, self.mask_prob, self.mask_length, generator)
        batch["mask_time_indices"] = mask
        batch["sampled_negative_indices"] = sample_negatives(mask, self.num_negatives, generator)
        batch["frame_lengths"] = frames
        return batch


class Wav2Vec2Pretraining(Objective):
    """Contrastive + diversity loss over masked frames; audio batches from an audio collator."""

    name = "wav2vec2"
    modality = "audio"

    def __init__(self, model_cfg: Wav2Vec2ModelConfig, loss: Wav2Vec2LossConfig, audio_collate: Any,
                 feature_extractor: Any = None) -> None:
        self.model = build_wav2vec2(model_cfg, loss)
        self.loss_cfg = loss
        self.size = model_cfg.size
        self.audio_collate = audio_collate
        self.feature_extractor = feature_extractor
        self.sample_rate = getattr(audio_collate, "sample_rate", 16000)
        cfg = self.model.config
        self.kernels, self.strides = tuple(cfg.conv_kernel), tuple(cfg.conv_stride)
        self.num_codevectors = cfg.num_codevectors_per_group * cfg.num_codevector_groups
        group_norm = self.model.config.feat_extract_norm == "group"
        self.feature_penalty_weight = (loss.feature_penalty_weight if loss.feature_penalty_weight is not None
                                       else 10.0 if group_norm else 0.0)
        self.feature_grad_scale = (loss.feature_grad_scale if loss.feature_grad_scale is not None
                                   else 0.1 if group_norm else 1.0)
        self.temperature = loss.gumbel_start
        self.step = 0
        self.low_perplexity_steps = 0
        self._features: torch.Tensor | None = None
        self.model.wav2vec2.feature_extractor.register_forward_hook(self._on_features)
        self.skips = AudioSkips(audio_collate)

    # feature encoder: gradient scale (paper: 0.1) and the features kept for the L2 penalty. As in
    # fairseq, the penalty is taken after the scale, so its gradient is scaled too (unscaled, its
    # weight of 10 outweighs the contrastive loss on small models and no code gets predicted).
    def _on_features(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        scale = self.feature_grad_scale
        if scale != 1.0 and output.requires_grad:
            output = _ScaleGrad.apply(output, scale)
        self._features = output
        return output

    def collator(self) -> SpanMaskingCollator:
        return SpanMaskingCollator(self.audio_collate, self.kernels, self.strides, self.loss_cfg.mask_prob,
                                   self.loss_cfg.mask_length, self.loss_cfg.num_negatives)

    def setup(self, context: TrainContext) -> None:
        self.skips.setup(context.rank)

    def count(self, batch: dict[str, Any]) -> dict[str, float]:
        """``skipped_audio_files``: distinct files, each counted once (see `AudioSkips`)."""
        seconds = float(batch["attention_mask"].sum()) / self.sample_rate
        return {"samples": int(batch["input_values"].shape[0]), "audio_seconds": seconds,
                "skipped_audio_files": self.skips.count(batch)}

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        if not model.training:
            self.skips.note(batch)
        mask = batch["mask_time_indices"]
        out = model(
            input_values=batch["input_values"], attention_mask=batch["attention_mask"],
            mask_time_indices=mask, sampled_negative_indices=batch["sampled_negative_indices"],
        )
        n = mask.sum().float()
        total = out.contrastive_loss + self.loss_cfg.diversity_weight * out.diversity_loss
        metrics: dict[str, Any] = {}
        features, self._features = self._features, None  # do not keep this step's graph alive
        if self.feature_penalty_weight > 0 and features is not None:
            penalty = features.float().pow(2).mean()
            total = total + self.feature_penalty_weight * penalty * n
            metrics["feature_penalty"] = penalty.detach()
        with torch.no_grad():
            correct = self._correct(out, batch, mask)
        metrics.update({
            # sums over masked frames, divided by their count over every batch and process
            "loss": Mean(total, n),
            "contrastive_loss": Mean(out.contrastive_loss.detach(), n),
            "diversity_loss": Mean(out.diversity_loss.detach(), n),
            "codevector_perplexity": out.codevector_perplexity.detach(),
            "contrastive_accuracy": Mean(correct, n),
            "masked_fraction": Mean(n, batch["frame_lengths"].sum().float()),
        })
        return metrics

    def _correct(self, out: Any, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Masked frames whose true quantized target scores above all distractors."""
        q = out.projected_quantized_states
        c = out.projected_states
        flat = q.reshape(-1, q.shape[-1])
        negatives = flat[batch["sampled_negative_indices"].reshape(-1)].view(*mask.shape, -1, q.shape[-1])
        pos = nn.functional.cosine_similarity(c, q, dim=-1)
        neg = nn.functional.cosine_similarity(c[:, :, None, :], negatives, dim=-1)
        neg = neg.masked_fill((negatives == q[:, :, None, :]).all(-1), float("-inf"))
        return ((pos[:, :, None] > neg).all(-1) & mask).sum().float()

    def on_step_end(self, step: int) -> dict[str, float]:
        self.step = step
        cfg = self.loss_cfg
        self.temperature = max(cfg.gumbel_end, cfg.gumbel_start * cfg.gumbel_decay**step)
        self.model.set_gumbel_temperature(self.temperature)
        return {"gumbel_temperature": self.temperature}

    def on_log(self, metrics: dict[str, float], step: int, warmup_steps: int) -> str | None:
        """A warning when the codebook has collapsed or accuracy sits at chance after warm-up."""
        if step <= warmup_steps or "codevector_perplexity" not in metrics:
            return None
        floor = self.loss_cfg.collapse_perplexity or 0.1 * self.num_codevectors
        chance = 1.0 / (self.loss_cfg.num_negatives + 1)
        collapsed = metrics["codevector_perplexity"] < floor
        stuck = metrics.get("contrastive_accuracy", 1.0) <= 1.5 * chance
        self.low_perplexity_steps = self.low_perplexity_steps + 1 if (collapsed or stuck) else 0
        if self.low_perplexity_steps < max(1, self.loss_cfg.collapse_patience):
            return None
        count, self.low_perplexity_steps = self.low_perplexity_steps, 0  # warn once per patience window
        if collapsed:
            msg = (f"step {step}: codevector perplexity {metrics['codevector_perplexity']:.1f} < {floor:.1f} for {count} "
                   "log intervals: the codebook is collapsing (the contrastive loss then falls for the wrong reason); "
                   "try a higher loss.diversity_weight, loss.gumbel_start=2.0, a lower trainer.lr or a longer warm-up")
        else:
            msg = (f"step {step}: contrastive accuracy {metrics.get('contrastive_accuracy', 0):.3f} at chance "
                   f"({chance:.3f}) for {count} log intervals; small models often sit at ln(K+1) for hundreds of "
                   "steps: train longer, or try a larger batch (data.max_batch_samples) or a higher trainer.lr")
        if self.loss_cfg.stop_on_collapse:
            raise TrainingError(msg)
        return msg

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "step": self.step, "low_perplexity_steps": self.low_perplexity_steps,
                "skips": self.skips.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.temperature = state["temperature"]
        self.step = state["step"]
        self.low_perplexity_steps = state.get("low_perplexity_steps", 0)
        self.model.set_gumbel_temperature(self.temperature)
        self.skips.load_state_dict(state.get("skips", {}))

    def save_pretrained(self, model: nn.Module, output_dir: Path) -> None:
        """The saved config carries the fine-tuning SpecAugment value, not pretraining's 0.65."""
        from transformers import Wav2Vec2FeatureExtractor

        pretrain_prob = model.config.mask_time_prob
        model.config.mask_time_prob = FINETUNE_MASK_TIME_PROB
        try:
            model.save_pretrained(output_dir)
        finally:
            model.config.mask_time_prob = pretrain_prob
        # Group-norm encoders (BASE) are fed zero-padded batches without a mask, as transformers advises.
        extractor = self.feature_extractor or Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=self.sample_rate, padding_value=0.0, do_normalize=True,
            return_attention_mask=model.config.feat_extract_norm == "layer",
        )
        extractor.save_pretrained(output_dir)

    def features(self, model: nn.Module, inputs: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """Mean over valid frames; sampling rate, normalisation and mask use as the saved extractor has them."""
        from multissl.models.features import audio_features

        fe = self.feature_extractor
        return audio_features(model, inputs, batch_size, sample_rate=getattr(fe, "sampling_rate", self.sample_rate),
                              normalize=getattr(fe, "do_normalize", True),
                              attention_mask=getattr(fe, "return_attention_mask", None))

    def model_card(self) -> ModelCardInfo:
        return ModelCardInfo(
            library_name="transformers", pipeline_tag="feature-extraction", method="wav2vec2",
            card_metrics=("contrastive_accuracy", "contrastive_loss", "codevector_perplexity"),
            arch="wav2vec2", size=self.size, parameters=sum(p.numel() for p in self.model.parameters()),
            auto_class="Wav2Vec2Model",
            usage=("from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model\n\n"
                      'extractor = Wav2Vec2FeatureExtractor.from_pretrained("{repo}")\n'
                      'model = Wav2Vec2Model.from_pretrained("{repo}")\n'
                      "inputs = extractor(waveform_16khz, sampling_rate=16000, return_tensors=\"pt\")\n"
                      "hidden = model(**inputs).last_hidden_state"),
        )

