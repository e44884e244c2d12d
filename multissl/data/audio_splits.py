"""Audio for pretraining, listed or streamed: the one entry point recipes call (``prepare_audio``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from multissl.data.audio import AudioDataConfig, AudioDataset, load_utterances
from multissl.data.demo import heldout_mask
from multissl.errors import DataError


def prepare_audio(cfg: AudioDataConfig, seed: int = 0) -> tuple[Any, Any]:
    """``(train, eval)`` utterance sets; eval holds out whole speakers when the data names them.

    The split does not depend on ``seed`` (a hash decides), so it is stable across runs. With
    ``cfg.streaming`` the two are `AudioStream`s instead of `AudioDataset`s.
    """
    if cfg.streaming:
        from multissl.data.audio_stream import stream_audio

        return stream_audio(cfg)
    ds, source = load_utterances(cfg)
    if cfg.validation_fraction == 0:
        return AudioDataset(ds, cfg), None
    mask = heldout_mask(ds["speaker"], cfg.validation_fraction) if "speaker" in ds.column_names else None
    if mask is None:
        mask = heldout_mask([Path(p).name for p in ds["path"]], cfg.validation_fraction)
    if mask is None:
        raise DataError(f"{source}: only {len(ds)} utterance(s); need at least 2 to hold out validation")
    held = np.flatnonzero(mask).tolist()
    train = np.flatnonzero(~mask).tolist()
    return AudioDataset(ds.select(train), cfg), AudioDataset(ds.select(held), cfg)
