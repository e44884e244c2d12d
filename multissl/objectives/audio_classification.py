"""Audio classification (keyword spotting, speaker or sound classes) with `transformers`'
``Wav2Vec2ForSequenceClassification``, fine-tuned from a wav2vec 2.0 output or trained from scratch.

The head projects every frame and mean-pools the frames the attention mask marks as valid, so padded
batches classify each clip as if it were alone: with the layer-norm feature encoder (our tiny and
small presets, the paper's LARGE) the convolutions and norms work frame by frame, and the saved
feature extractor returns the mask so `transformers.pipeline` pads the same way. Group-norm encoders
(BASE) normalise over time, so padding does leak into their features; batches of similar length
(duration batching) keep that small.

Labels are turned into ids once, when the data are prepared (`label_splits`), naming the file and
column of any label the label map cannot place; the collator keeps them aligned with the clips that
survive bad-file skipping (the audio collator's ``kept``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from multissl.data.audio import AudioDataset, AudioSkips
from multissl.data.audio_tasks import LabelledAudioDataConfig, prepare_labelled_audio
from multissl.data.labels import LabelMap, infer_label_map
from multissl.errors import ConfigError, DataError
from multissl.models.conv_features import activation_before_transpose
from multissl.models.encoder_input import encoder_gets_a_copy
from multissl.objectives.classification import labelled_step, summarize_classification
from multissl.objectives.finetune import finetuned_card
from multissl.training.objective import ModelCardInfo, Objective, TrainContext

WAV2VEC2_TYPES = ("wav2vec2",)
LABEL_COLUMN = "label"


@dataclass
class AudioClassifierModelConfig:
    """``init_from`` a wav2vec 2.0 output (a run folder, model folder or Hub id); empty = a new model
    of the wav2vec2 recipe's ``size`` preset, trained from scratch."""

    init_from: str = ""
    random_init: bool = False
    """Keep init_from's architecture but start from random weights (the lift baseline)."""
    size: Literal["tiny", "small", "base"] = "tiny"
    """Without init_from: the wav2vec2 recipe's preset to build (recipes/configs/wav2vec2)."""
    freeze_feature_encoder: bool = True
    """Keep the convolutional feature encoder fixed (the usual wav2vec 2.0 fine-tuning practice). Random
    weights (no init_from, or random_init) learn more with it trainable: tiny keyword preset, held-out
    accuracy 0.56 instead of 0.33."""
    freeze_base_model: bool = False
    """Train the projector and classifier only (a linear-ish probe of the pretrained features)."""
    use_weighted_layer_sum: bool = False
    """Pool a learned softmax-weighted sum of every layer's output instead of the last layer's."""
    mask_time_prob: float = 0.05
    """SpecAugment on the frames while training: share of frames that start a masked span (0 = off)."""
    mask_time_length: int = 10
    mask_time_min_masks: int = 0
    """Spans masked per clip at least. transformers' default, 2, masks 2 spans of 10 frames in every
    clip: ~40% of a 1 s clip (49 frames), often the whole keyword; 0 leaves it to mask_time_prob."""
    dropout: float | None = None
    """Hidden, attention and feature-projection dropout; None = the pretrained config's."""
    classifier_proj_size: int = 256
    """Width of the frame projection that is pooled before the classifier."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_time_prob < 1.0:
            raise ConfigError(f"model.mask_time_prob must be in [0, 1), got {self.mask_time_prob}")
        if self.mask_time_length < 1 or self.mask_time_min_masks < 0 or self.classifier_proj_size < 1:
            raise ConfigError("model.mask_time_length and model.classifier_proj_size must be >= 1, "
                              "model.mask_time_min_masks >= 0")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


# ------------------------------------------------------------------------------------ data
def _stratum(labels: LabelMap, value: Any) -> int:
    """A label's id for stratified subsets; unknown labels share one stratum (`_with_ids` names them)."""
    try:
        return labels.to_id(value, "")
    except DataError:
        return -1


def _with_ids(ds: AudioDataset, labels: LabelMap, where: str) -> AudioDataset:
    """The dataset with its label column as ids; a label outside the map is an error naming the file."""
    ids = [labels.to_id(value, f"{where}: {path}, column {LABEL_COLUMN!r}")
           for value, path in zip(ds.data[LABEL_COLUMN], ds.data["path"])]
    return ds.with_data(ds.data.remove_columns(LABEL_COLUMN).add_column(LABEL_COLUMN, ids))


def label_splits(cfg: LabelledAudioDataConfig, default_manifest: Callable[[], Path],
                 output_dir: str | Path | None = None) -> tuple[AudioDataset, AudioDataset, LabelMap, str]:
    """``(train, eval, labels, source)`` with integer labels. The label map comes from ``cfg.labels``,
    else the training split's sorted distinct labels; ``label_fraction`` keeps the same share of every
    class; eval speakers are held out whole. Unusable files are listed under ``output_dir`` (see
    `prepare_audio`)."""
    found: list[LabelMap] = []

    def strata(values: list[Any]) -> list[int]:
        found.append(infer_label_map(values, None, cfg.labels))
        return [_stratum(found[0], v) for v in values]

    train, held, source = prepare_labelled_audio(cfg, LABEL_COLUMN, default_manifest, strata, output_dir)
    labels = found[0]
    return _with_ids(train, labels, source), _with_ids(held, labels, f"{source} (eval)"), labels, source


# ----------------------------------------------------------------------------------- model
def scratch_config(size: str) -> Any:
    """The ``Wav2Vec2Config`` the wav2vec2 recipe builds for ``size`` (on the meta device, so no weights)."""
    from multissl.objectives.wav2vec2 import Wav2Vec2LossConfig, Wav2Vec2ModelConfig, build_wav2vec2

    with torch.device("meta"):
        return build_wav2vec2(Wav2Vec2ModelConfig(size=size), Wav2Vec2LossConfig()).config  # type: ignore


def config_overrides(cfg: AudioClassifierModelConfig, labels: LabelMap) -> dict[str, Any]:
    """What the task sets on the pretrained config: labels, SpecAugment, pooling, dropout."""
    out: dict[str, Any] = {
        "id2label": labels.id2label, "label2id": labels.label2id, "mask_time_prob": cfg.mask_time_prob,
        "mask_time_length": cfg.mask_time_length, "mask_time_min_masks": cfg.mask_time_min_masks,
        "use_weighted_layer_sum": cfg.use_weighted_layer_sum,
        "classifier_proj_size": cfg.classifier_proj_size,
    }
    if cfg.dropout is not None:
        out.update(dict.fromkeys(("hidden_dropout", "attention_dropout", "feat_proj_dropout"), cfg.dropout))
    return out


def build_audio_classifier(cfg: AudioClassifierModelConfig, labels: LabelMap) -> tuple[nn.Module, str]:
    """``(Wav2Vec2ForSequenceClassification, source)``; source is "" for a from-scratch model."""
    from transformers import AutoModelForAudioClassification, Wav2Vec2ForSequenceClassification

    from multissl.objectives.finetune import load_for_finetuning

    overrides = config_overrides(cfg, labels)
    if cfg.init_from:  # the Auto class maps a wav2vec2 config to Wav2Vec2ForSequenceClassification
        model, source = load_for_finetuning(AutoModelForAudioClassification, cfg.init_from, cfg.random_init,
                                            WAV2VEC2_TYPES, **overrides)
    else:
        config = scratch_config(cfg.size)
        for key, value in overrides.items():
            setattr(config, key, value)
        model, source = Wav2Vec2ForSequenceClassification(config), ""
    if cfg.freeze_base_model:
        model.freeze_base_model()
    elif cfg.freeze_feature_encoder:
        model.freeze_feature_encoder()
    encoder_gets_a_copy(activation_before_transpose(model))
    return model, source


def feature_extractor_for(model_config: Any, sample_rate: int, normalize: bool, source: str = "") -> Any:
    """The ``Wav2Vec2FeatureExtractor`` saved with the model: it prepares audio as our collator does
    (rate, per-clip normalisation), and returns the attention mask for layer-norm encoders so padded
    batches pool valid frames only. A pretrained model saved at another rate is an error."""
    from transformers import Wav2Vec2FeatureExtractor

    if source:
        try:
            pretrained = Wav2Vec2FeatureExtractor.from_pretrained(source)
        except Exception:  # no preprocessor_config.json: nothing to check against
            pretrained = None
        if pretrained is not None and pretrained.sampling_rate != sample_rate:
            rate = pretrained.sampling_rate
            raise ConfigError(f"model.init_from={source!r} was trained on {rate} Hz audio, "
                              f"data.sample_rate is {sample_rate}; set data.sample_rate={rate}")
    return Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=sample_rate, padding_value=0.0, do_normalize=normalize,
        return_attention_mask=model_config.feat_extract_norm == "layer",
    )


# ------------------------------------------------------------------------------- objective
@dataclass
class LabelledAudioCollator:
    """Audio batch plus the labels and paths of the clips that survived bad-file skipping."""

    audio_collate: Any

    def __call__(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, Any]:
        batch = self.audio_collate(samples, generator)
        kept = batch.pop("kept").tolist()
        batch["labels"] = torch.tensor([int(samples[i][LABEL_COLUMN]) for i in kept], dtype=torch.long)
        batch["path"] = [str(samples[i]["path"]) for i in kept]
        return batch


class AudioClassification(Objective):
    """Cross-entropy over clip-level labels; accuracy and macro-F1; one prediction row per eval clip."""

    name = "audio-classification"
    best_metric = "accuracy"

    def __init__(self, model: nn.Module, labels: LabelMap, audio_collate: Any, feature_extractor: Any,
                 base_model: str = "") -> None:
        self.model, self.labels = model, labels
        self.audio_collate, self.feature_extractor = audio_collate, feature_extractor
        self.sample_rate = getattr(audio_collate, "sample_rate", 16000)
        self.base_model = base_model
        self.skips = AudioSkips(audio_collate)

    def collator(self) -> LabelledAudioCollator:
        return LabelledAudioCollator(self.audio_collate)

    def setup(self, context: TrainContext) -> None:
        self.skips.setup(context.rank)

    def count(self, batch: dict[str, Any]) -> dict[str, float]:
        """``skipped_audio_files``: distinct files, each counted once (see `AudioSkips`)."""
        return {"samples": int(batch["labels"].shape[0]),
                "audio_seconds": float(batch["attention_mask"].sum()) / self.sample_rate,
                "skipped_audio_files": self.skips.count(batch)}

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        if not model.training:
            self.skips.note(batch)
        return labelled_step(model(input_values=batch["input_values"], attention_mask=batch["attention_mask"]).logits, batch, self.labels, model.training)

    def summarize(self, metrics: dict[str, float]) -> dict[str, float]:
        return summarize_classification(metrics, self.labels.num_labels)

    def state_dict(self) -> dict[str, Any]:
        return {"skips": self.skips.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skips.load_state_dict(state.get("skips", {}))

    def save_pretrained(self, model: nn.Module, output_dir: Path) -> None:
        model.save_pretrained(output_dir)
        self.feature_extractor.save_pretrained(output_dir)

    def model_card(self) -> ModelCardInfo:
        return finetuned_card(
            self.model, self.name, self.base_model, pipeline_tag="audio-classification",
            card_metrics=("accuracy", "macro_f1"), auto_class="AutoModelForAudioClassification",
            usage=("import soundfile\n"
                   "from transformers import pipeline\n\n"
                   'classify = pipeline("audio-classification", model="{repo}")\n'
                   'audio, rate = soundfile.read("clip.wav", dtype="float32")\n'
                   'print(classify({"raw": audio, "sampling_rate": rate}))'))
