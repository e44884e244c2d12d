"""CTC speech recognition: fine-tune a wav2vec 2.0 encoder (``Wav2Vec2ForCTC``) to emit characters.

What transformers lacks and this module adds: transcripts normalised and checked row by row, the
character vocabulary built from the training transcripts (``<pad>`` = id 0 is the CTC blank, as
``Wav2Vec2ForCTC``'s loss takes ``pad_token_id`` for the blank; ``|`` stands for the space), labels
that stay aligned with the audio when a bad file is skipped, and WER/CER that are exact over the
whole eval split: every batch returns its word/character edit counts over its reference lengths as
``Mean(errors, ref_len)``, so the pooled ratio is the corpus WER/CER (not a mean of per-utterance
rates). Greedy decoding is the tokenizer's own (argmax, repeats collapsed, blanks dropped), so the
predictions logged here are what ``pipeline("automatic-speech-recognition")`` prints for the
exported model.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from multissl.data.audio import AudioDataset, AudioSkips
from multissl.data.audio_tasks import NAMED_IN_WARNINGS, LabelledAudioDataConfig
from multissl.errors import ConfigError, DataError
from multissl.metrics import Mean
from multissl.models.conv_features import activation_before_transpose
from multissl.models.encoder_input import encoder_gets_a_copy
from multissl.objectives.finetune import finetuned_card
from multissl.training.objective import (
    LOWER_IS_BETTER,
    ModelCardInfo,
    Objective,
    TrainContext,
    lower_is_better_by_name,
)

PAD, UNK, DELIMITER = "<pad>", "<unk>", "|"
SPECIAL_TOKENS = (PAD, UNK, DELIMITER)  # ids 0, 1, 2; characters follow in sorted order
IGNORE_INDEX = -100  # label padding; Wav2Vec2ForCTC's loss only reads labels >= 0
# Punctuation that is not spoken. The apostrophe is kept (it is part of words: "don't"), a
# typographic one (U+2019) is first turned into it; "|" is removed because it is the word delimiter.
DEFAULT_CHARS_TO_IGNORE = r"""[,.?!;:"“”‘«»()\[\]{}…–—|-]"""


@dataclass
class SpeechRecognitionDataConfig(LabelledAudioDataConfig):
    """Utterances with a ``transcript`` (manifest field or dataset column)."""

    chars_to_ignore: str = DEFAULT_CHARS_TO_IGNORE
    """A regex of characters removed from transcripts (after lower-casing, before the vocabulary is
    built); default: common punctuation and dashes, not the apostrophe. Quote it on the command line
    (``'data.chars_to_ignore="[,.?!]"'``), or YAML reads the brackets as a list."""
    unknown_chars: Literal["unk", "error"] = "unk"
    """Eval transcripts with characters the training transcripts lack: "unk" maps them to ``<unk>``
    in the eval labels, with one warning and a count (the references keep them, so WER/CER count
    them as errors); "error" stops with an error naming the first such utterance."""

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            re.compile(self.chars_to_ignore)
        except re.error as err:
            raise ConfigError(f"data.chars_to_ignore={self.chars_to_ignore!r} is not a valid regex ({err})") from None


@dataclass
class CTCModelConfig:
    """``init_from`` a wav2vec 2.0 output (run folder, model folder or Hub id); empty = a new model
    of ``size`` shaped like the wav2vec2 recipe's presets, so the lift comparison is like for like."""

    init_from: str = ""
    random_init: bool = False
    """Keep init_from's architecture but start from random weights (the lift report's baseline)."""
    size: Literal["tiny", "small", "base"] = "tiny"
    """With no init_from: the wav2vec2 recipe's preset to build from scratch."""
    freeze_feature_encoder: bool = True
    """Keep the convolutional feature encoder's weights fixed (the paper's fine-tuning setup)."""
    mask_time_prob: float = 0.05
    """SpecAugment: share of frames that start a masked span while training (fine-tuning value)."""
    mask_time_length: int = 10
    layerdrop: float = 0.0
    """Probability of skipping a transformer layer per step (paper: 0.05-0.1 for BASE; a 2-layer
    model loses half its depth when one is dropped)."""
    dropout: float = 0.1
    """Hidden, attention, feature-projection and final (before the CTC head) dropout."""
    activation_dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("mask_time_prob", "layerdrop", "dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.mask_time_length < 1:
            raise ConfigError(f"model.mask_time_length must be >= 1, got {self.mask_time_length}")


# ------------------------------------------------------------------------------- transcripts
def normalize_transcript(text: str, ignore: re.Pattern[str] | None) -> str:
    """Lower-cased, typographic apostrophes made plain, ``ignore`` removed, whitespace collapsed."""
    text = str(text).lower().replace("\u2019", "'")
    if ignore is not None:
        text = ignore.sub("", text)
    return " ".join(text.split())


def build_vocab(transcripts: Iterable[str]) -> dict[str, int]:
    """``<pad>`` (the CTC blank) = 0, ``<unk>`` = 1, ``|`` (space) = 2, then every character of the
    (normalised) transcripts in sorted order: the same transcripts always give the same ids."""
    chars = sorted(set().union(*(set(t) for t in transcripts)) - {" "})
    clash = [c for c in chars if c in SPECIAL_TOKENS]
    if clash:
        raise DataError(f"transcripts contain the word delimiter {clash[0]!r}; add it to data.chars_to_ignore")
    return {**{t: i for i, t in enumerate(SPECIAL_TOKENS)}, **{c: i + len(SPECIAL_TOKENS) for i, c in enumerate(chars)}}


def encode(text: str, vocab: dict[str, int]) -> list[int]:
    """Label ids of a normalised transcript; characters outside ``vocab`` become ``<unk>``."""
    unk = vocab[UNK]
    return [vocab.get(DELIMITER if c == " " else c, unk) for c in text]


def unknown_chars(text: str, vocab: dict[str, int]) -> str:
    """The distinct characters of ``text`` that ``vocab`` lacks, sorted."""
    return "".join(sorted({c for c in text if c != " " and c not in vocab}))


def _named(items: list[str]) -> str:
    return ", ".join(items[:NAMED_IN_WARNINGS]) + (" ..." if len(items) > NAMED_IN_WARNINGS else "")


def with_text(ds: AudioDataset, cfg: SpeechRecognitionDataConfig, where: str) -> AudioDataset:
    """``ds`` plus a ``text`` column (the normalised transcript). Utterances left with no text, or
    longer than ``data.max_seconds`` (the collator would crop them and cut their transcript), are
    counted and skipped with a warning."""
    ignore = re.compile(cfg.chars_to_ignore) if cfg.chars_to_ignore else None
    texts = [normalize_transcript(t, ignore) for t in ds.data["transcript"]]
    paths, durations = ds.data["path"], ds.data["duration"]
    empty = [i for i, t in enumerate(texts) if not t]
    long = [i for i, d in enumerate(durations) if d > cfg.max_seconds and texts[i]]
    if empty:
        print(f"warning: {where}: skipped {len(empty)} utterance(s) whose transcript is empty after removing "
              f"data.chars_to_ignore: {_named([paths[i] for i in empty])}", flush=True)
    if long:
        print(f"warning: {where}: skipped {len(long)} utterance(s) longer than data.max_seconds={cfg.max_seconds} "
              f"(cropping would cut their transcripts; raise data.max_seconds to keep them): "
              f"{_named([paths[i] for i in long])}", flush=True)
    dropped = set(empty) | set(long)
    keep = [i for i in range(len(texts)) if i not in dropped]
    if not keep:
        raise DataError(f"{where}: no utterance is left with a transcript and at most data.max_seconds of audio")
    data = ds.data.add_column("text", texts).select(keep)
    return ds.with_data(data)


def check_eval_chars(ds: AudioDataset, vocab: dict[str, int], on_unknown: str, where: str) -> int:
    """Eval utterances whose text has characters outside ``vocab``: an error naming the first one, or
    (``"unk"``) one warning naming a few; returns how many utterances have them."""
    found = [(p, u) for p, t in zip(ds.data["path"], ds.data["text"]) if (u := unknown_chars(t, vocab))]
    if not found:
        return 0
    path, chars = found[0]
    if on_unknown == "error":
        raise DataError(f"{where}: {path}: transcript has character(s) {chars!r} that no training transcript has "
                        "(set data.unknown_chars=unk to score them as <unk>)")
    every = "".join(sorted(set("".join(u for _, u in found))))
    print(f"warning: {where}: {len(found)} eval utterance(s) have character(s) {every!r} that no training transcript "
          f"has; their labels use <unk> and WER/CER count them as errors: "
          f"{_named([f'{p} ({u!r})' for p, u in found])}", flush=True)
    return len(found)


def prepare_transcripts(train: AudioDataset, held: AudioDataset, cfg: SpeechRecognitionDataConfig, source: str
                        ) -> tuple[AudioDataset, AudioDataset, dict[str, int]]:
    """Normalised ``text`` on both splits, the vocabulary of the training split, eval checked against it."""
    train = with_text(train, cfg, source)
    held = with_text(held, cfg, f"{source} (eval)")
    vocab = build_vocab(train.data["text"])
    check_eval_chars(held, vocab, cfg.unknown_chars, f"{source} (eval)")
    return train, held, vocab


# ------------------------------------------------------------------------------- model, processor
def make_tokenizer(vocab: dict[str, int]) -> Any:
    """A ``Wav2Vec2CTCTokenizer`` over ``vocab``; no ``<s>``/``</s>`` (CTC never emits them, and they
    would add ids the model's head does not have), no clean-up that would rewrite "it 's"."""
    from transformers import Wav2Vec2CTCTokenizer

    with tempfile.TemporaryDirectory(prefix="multissl-ctc-") as tmp:
        path = Path(tmp) / "vocab.json"
        path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        return Wav2Vec2CTCTokenizer(str(path), bos_token=None, eos_token=None, unk_token=UNK, pad_token=PAD,
                                    word_delimiter_token=DELIMITER, clean_up_tokenization_spaces=False)


def make_processor(vocab: dict[str, int], data: SpeechRecognitionDataConfig, model_config: Any) -> Any:
    """Tokenizer + a feature extractor that prepares audio as the training collator does (rate and
    per-utterance normalisation), so the exported model transcribes what it was trained on."""
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=data.sample_rate, padding_value=0.0,
                                         do_normalize=data.normalize,
                                         return_attention_mask=model_config.feat_extract_norm == "layer")
    return Wav2Vec2Processor(feature_extractor=extractor, tokenizer=make_tokenizer(vocab))


def ctc_config_kwargs(cfg: CTCModelConfig, vocab: dict[str, int]) -> dict[str, Any]:
    """What fine-tuning sets on the model config. Loss reduction "mean" divides each utterance's loss
    by its transcript length, then averages: its scale (and so the learning rate) does not depend on
    the batch budget or transcript lengths. zero_infinity: an utterance with fewer frames than labels
    gives an infinite loss, which is zeroed instead of making the step non-finite."""
    return {
        "vocab_size": len(vocab), "pad_token_id": vocab[PAD], "ctc_loss_reduction": "mean", "ctc_zero_infinity": True,
        "mask_time_prob": cfg.mask_time_prob, "mask_time_length": cfg.mask_time_length, "layerdrop": cfg.layerdrop,
        "hidden_dropout": cfg.dropout, "attention_dropout": cfg.dropout, "feat_proj_dropout": cfg.dropout,
        "final_dropout": cfg.dropout, "activation_dropout": cfg.activation_dropout,
    }


def build_ctc_model(cfg: CTCModelConfig, vocab: dict[str, int]) -> tuple[nn.Module, str]:
    """``(Wav2Vec2ForCTC, source)``: the encoder of ``init_from`` (a pretraining output's quantizer and
    projections are dropped, the CTC head is new), or a new model of the wav2vec2 recipe's ``size``."""
    from transformers import Wav2Vec2ForCTC

    kwargs = ctc_config_kwargs(cfg, vocab)
    if cfg.init_from:
        from transformers import AutoModelForCTC

        from multissl.objectives.finetune import load_for_finetuning

        model, source = load_for_finetuning(AutoModelForCTC, cfg.init_from, cfg.random_init, ("wav2vec2",), **kwargs)
    else:
        from multissl.objectives.wav2vec2 import Wav2Vec2LossConfig, Wav2Vec2ModelConfig, build_wav2vec2

        config = build_wav2vec2(Wav2Vec2ModelConfig(size=cfg.size), Wav2Vec2LossConfig()).config
        for key, value in kwargs.items():
            setattr(config, key, value)
        model, source = Wav2Vec2ForCTC(config), ""
    if cfg.freeze_feature_encoder:
        model.freeze_feature_encoder()
    return encoder_gets_a_copy(activation_before_transpose(model)), source


# ------------------------------------------------------------------------------- decoding, metrics
def greedy_decode(logits: torch.Tensor, frames: torch.Tensor, tokenizer: Any) -> list[str]:
    """Best path: argmax per frame, padding frames set to the blank; the tokenizer collapses repeats,
    drops blanks and turns ``|`` into spaces (what the ASR pipeline does for one utterance)."""
    ids = logits.argmax(-1)
    past_end = torch.arange(ids.shape[1], device=ids.device)[None, :] >= frames.to(ids.device)[:, None]
    ids = ids.masked_fill(past_end, tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids.tolist())


def edit_counts(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Word and character edits (substitutions + deletions + insertions) and reference lengths, by
    jiwer; characters include the spaces between words (jiwer's CER). Runs of spaces in a hypothesis
    (``|`` blank ``|``) count as one."""
    import jiwer

    hypotheses = [" ".join(h.split()) for h in hypotheses]
    words = jiwer.process_words(references, hypotheses)
    chars = jiwer.process_characters(references, hypotheses)
    return {
        "word_errors": words.substitutions + words.deletions + words.insertions,
        "words": words.substitutions + words.deletions + words.hits,
        "char_errors": chars.substitutions + chars.deletions + chars.insertions,
        "chars": chars.substitutions + chars.deletions + chars.hits,
    }


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, Mean]:
    """``wer`` and ``cer`` as edit counts over reference lengths: summed over batches and processes,
    their ratio is the corpus rate."""
    c = edit_counts(references, hypotheses)
    return {"wer": Mean(torch.tensor(float(c["word_errors"])), float(c["words"])),
            "cer": Mean(torch.tensor(float(c["char_errors"])), float(c["chars"]))}


# ------------------------------------------------------------------------------- objective
@dataclass
class TranscriptCollator:
    """Audio batches with their transcripts as character ids (CTC labels)."""

    audio_collate: Any
    vocab: dict[str, int]

    def __call__(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, Any]:
        batch: dict[str, Any] = self.audio_collate(samples, generator)
        kept = [samples[i] for i in batch["kept"].tolist()]  # a skipped bad file takes its transcript along
        ids = [encode(s["text"], self.vocab) for s in kept]
        labels = torch.full((len(ids), max(len(x) for x in ids)), IGNORE_INDEX, dtype=torch.long)
        for row, x in enumerate(ids):
            labels[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        batch.update(labels=labels, text=[s["text"] for s in kept], path=[s["path"] for s in kept])
        return batch


class SpeechRecognition(Objective):
    """CTC loss on ``Wav2Vec2ForCTC``; eval adds greedy-decoded WER/CER and one prediction per utterance."""

    name = "speech-recognition"
    # CER picks the exported model: a tiny model gets most words partly wrong for a long time (WER
    # sits near 1.0 while CER falls), and at any scale CER still ranks models whose WERs tie.
    best_metric = "cer"

    def __init__(self, model: nn.Module, processor: Any, audio_collate: Any, base_model: str = "") -> None:
        self.model, self.processor = model, processor
        self.tokenizer = processor.tokenizer
        self.vocab = dict(self.tokenizer.get_vocab())
        self.audio_collate = audio_collate
        self.sample_rate = getattr(audio_collate, "sample_rate", 16000)
        self.base_model = base_model
        self.skips = AudioSkips(audio_collate)

    def collator(self) -> TranscriptCollator:
        return TranscriptCollator(self.audio_collate, self.vocab)

    def setup(self, context: TrainContext) -> None:
        self.skips.setup(context.rank)

    def state_dict(self) -> dict[str, Any]:
        return {"skips": self.skips.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skips.load_state_dict(state.get("skips", {}))

    def lower_is_better(self, metric: str) -> bool:
        return lower_is_better_by_name(metric, (*LOWER_IS_BETTER, "wer", "cer"))

    def count(self, batch: dict[str, Any]) -> dict[str, float]:
        return {"samples": int(batch["input_values"].shape[0]),
                "audio_seconds": float(batch["attention_mask"].sum()) / self.sample_rate,
                "skipped_audio_files": self.skips.count(batch)}

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        if not model.training:
            self.skips.note(batch)
        out = model(input_values=batch["input_values"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        n = batch["labels"].shape[0]
        metrics: dict[str, Any] = {"loss": Mean(out.loss * n, n)}  # per-utterance mean over every eval utterance
        if not model.training:
            frames = self.model._get_feat_extract_output_lengths(batch["attention_mask"].sum(1))
            hypotheses = greedy_decode(out.logits.detach(), frames, self.tokenizer)
            metrics.update(error_rates(batch["text"], hypotheses))
            metrics["predictions"] = [{"path": p, "reference": r, "prediction": h}
                                      for p, r, h in zip(batch["path"], batch["text"], hypotheses)]
        return metrics

    def save_pretrained(self, model: nn.Module, output_dir: Path) -> None:
        """The model and a ``Wav2Vec2Processor`` (feature extractor + tokenizer): what the ASR pipeline loads."""
        model.save_pretrained(output_dir)
        self.processor.save_pretrained(output_dir)

    def model_card(self) -> ModelCardInfo:
        return finetuned_card(
            self.model, self.name, self.base_model, pipeline_tag="automatic-speech-recognition",
            card_metrics=("wer", "cer"), auto_class="AutoModelForCTC",
            usage=("import soundfile as sf\n"
                   "from transformers import pipeline\n\n"
                   'transcribe = pipeline("automatic-speech-recognition", model="{repo}")\n'
                   f'audio, rate = sf.read("speech.wav", dtype="float32")  # mono; resampled to {self.sample_rate} Hz\n'
                   'print(transcribe({"raw": audio, "sampling_rate": rate})["text"])'))

