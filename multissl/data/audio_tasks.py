"""Labelled audio for fine-tuning: utterances with a ``label`` (audio classification) or a
``transcript`` (speech recognition), held out by speaker, with label-fraction subsets."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from multissl.data.audio import AudioDataConfig, AudioDataset
from multissl.data.audio_splits import prepare_audio
from multissl.data.labels import is_missing, stratified_subset, warn_skipped
from multissl.errors import ConfigError, DataError

NAMED_IN_WARNINGS = 3  # bad rows named in a warning (the rest are counted)


@dataclass
class LabelledAudioDataConfig(AudioDataConfig):
    """An audio source whose manifest or dataset has a ``label`` or ``transcript`` column."""

    labels: list[str] = field(default_factory=list)
    """Audio classification: class names in id order; empty = the sorted distinct labels."""
    label_fraction: float = 1.0
    """Train on this share of the training utterances (stratified by label for classification)."""
    subset_seed: int = 0
    """Which utterances a label_fraction below 1 keeps."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"data.label_fraction must be in (0, 1], got {self.label_fraction}")
        if self.streaming:
            raise ConfigError("data.streaming is not supported for fine-tuning (label maps and subsets need the whole set)")


def _usable(ds: AudioDataset, column: str, where: str) -> list[int]:
    """Rows with a value in ``column``; the others are counted and skipped with one warning."""
    values = ds.data[column]
    keep = [i for i, v in enumerate(values) if not is_missing(v)]
    dropped = [ds.data["path"][i] for i, v in enumerate(values) if is_missing(v)]
    warn_skipped(where, f"{len(dropped)} utterance(s) with an empty {column!r}", dropped)
    if not keep:
        raise DataError(f"{where}: no utterance has a {column!r}")
    return keep


def prepare_labelled_audio(cfg: LabelledAudioDataConfig, column: Literal["label", "transcript"],
                           default_manifest: Callable[[], Path], label_ids: Callable[[list[object]], list[int]] | None = None,
                           output_dir: str | Path | None = None) -> tuple[AudioDataset, AudioDataset, str]:
    """``(train, eval, source)``: eval holds out whole speakers (as in pretraining); training keeps
    ``label_fraction`` of its utterances, the same share of every class when ``label_ids`` is given.
    Files loading left out travel with ``train`` (see `prepare_audio`; listed under ``output_dir``)."""
    source = cfg.manifest or cfg.dataset or ", ".join(cfg.files)
    if not source:
        cfg = dataclasses.replace(cfg, manifest=str(default_manifest()))
        source = "embedded demo"
    train, held = prepare_audio(cfg, output_dir=output_dir)
    if held is None:
        raise ConfigError("fine-tuning needs an eval split: set data.validation_fraction > 0")
    if column not in train.data.column_names:
        raise DataError(f"{source}: no {column!r} column (columns: {', '.join(train.data.column_names)}); "
                        f"a manifest for this task needs a {column!r} field per utterance")
    train = train.with_data(train.data.select(_usable(train, column, source)))
    held = held.with_data(held.data.select(_usable(held, column, f"{source} (eval)")))
    keys = label_ids(train.data[column]) if label_ids is not None else [0] * len(train)
    keep = stratified_subset(keys, cfg.label_fraction, cfg.subset_seed)
    return train.with_data(train.data.select(keep)), held, source
