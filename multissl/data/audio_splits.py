"""Audio for pretraining, listed or streamed: the one entry point recipes call (``prepare_audio``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from multissl.data.audio import AudioDataConfig, AudioDataset, AudioReport, load_utterances
from multissl.data.demo import heldout_mask
from multissl.errors import DataError


def prepare_audio(cfg: AudioDataConfig, seed: int = 0, output_dir: str | Path | None = None) -> tuple[Any, Any]:
    """``(train, eval)`` utterance sets; eval holds out whole speakers when the data names them.

    The split does not depend on ``seed`` (a hash decides), so it is stable across runs. With
    ``cfg.streaming`` the two are `AudioStream`s instead of `AudioDataset`s. The files loading left
    out travel with ``train`` (to its collator, then the objective's `AudioSkips`, which counts them
    once and lists them in ``output_dir/data/skipped_audio_files`` when ``output_dir`` is given).
    """
    skip_dir = str(output_dir) if output_dir is not None else ""
    if cfg.streaming:
        from multissl.data.audio_stream import stream_audio

        return stream_audio(cfg, skip_dir)
    report = AudioReport(skip_dir=skip_dir)
    ds, source = load_utterances(cfg, report)
    skips = report.pairs()
    if cfg.validation_fraction == 0:
        return AudioDataset(ds, cfg, skips, skip_dir), None
    mask = heldout_mask(ds["speaker"], cfg.validation_fraction) if "speaker" in ds.column_names else None
    if mask is None:
        mask = heldout_mask([Path(p).name for p in ds["path"]], cfg.validation_fraction)
    if mask is None:
        raise DataError(f"{source}: only {len(ds)} utterance(s); need at least 2 to hold out validation")
    held = np.flatnonzero(mask).tolist()
    train = np.flatnonzero(~mask).tolist()
    return AudioDataset(ds.select(train), cfg, skips, skip_dir), AudioDataset(ds.select(held), cfg)
