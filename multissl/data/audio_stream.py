"""Streaming audio (``data.streaming=true``): utterances read as they come, for corpora too large
to list and probe up front (a Hub dataset, parquet shards, a long manifest).

Nothing is read before training starts. Each process reads its own part of the stream
(``split_dataset_by_node``), fills a buffer of ``data.shuffle_buffer`` utterances, reads their
durations from the headers, and cuts the buffer into duration batches under the samples budget,
as `DurationBatchSampler` does for a whole epoch. A file that cannot be read goes to the collator
with length 0, which counts and skips it like any other bad file. Resume replays the stream up to
the saved batch (streams cannot seek); each batch's seed depends only on its position, so the
replayed batches are the same. The buffering, sharding, seeds and replay are the shared
`multissl.training.loader.BufferedStream` and `split_by_node`, which streamed images use too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from multissl.data.audio import (
    OPTIONAL_COLUMNS,
    AudioCollator,
    AudioDataConfig,
    UndecodableAudio,
    _probe,
    duration_batches,
)
from multissl.data.sources import open_dataset
from multissl.errors import DataError
from multissl.training.loader import BufferedStream, split_by_node


class AudioStream:
    """One side (train or held-out) of a streamed utterance source; `make_loader` calls `make_stream`."""

    def __init__(self, source: Any, cfg: AudioDataConfig, description: str) -> None:
        self.source, self.cfg, self.description = source, cfg, description

    def collator(self) -> AudioCollator:
        return AudioCollator.from_config(self.cfg)

    def make_stream(self, *, batch_size: int, seed: int, shuffle: bool, drop_last: bool, rank: int,
                    world_size: int, split_tag: int) -> DurationStream:
        """``batch_size`` and ``drop_last`` are unused: the samples budget sizes the batches, and a
        stream's last batch is kept (processes may end epochs at different batches)."""
        return DurationStream(split_by_node(self.source, rank, world_size), self.cfg, seed=seed, shuffle=shuffle,
                              split_tag=split_tag, rank=rank)


class DurationStream(BufferedStream):
    """``(rows, batch_seed)`` batches of a stream, cut by duration within buffers of
    ``data.shuffle_buffer`` utterances (the buffering, seeds and resume are `BufferedStream`'s)."""

    def __init__(self, source: Any, cfg: AudioDataConfig, *, seed: int, shuffle: bool, split_tag: int,
                 rank: int) -> None:
        super().__init__(source, self._cut, buffer_size=cfg.shuffle_buffer, seed=seed, shuffle=shuffle,
                         split_tag=split_tag, rank=rank)
        self.cfg = cfg

    def _length(self, row: dict[str, Any]) -> int:
        """Samples after resampling and cropping; 0 for a file whose header cannot be read."""
        try:
            seconds = _probe(row["bytes"] if row.get("bytes") else row["path"])
        except UndecodableAudio:
            return 0
        if seconds < self.cfg.min_seconds:
            return -1
        return min(math.ceil(seconds * self.cfg.sample_rate - 1e-6), self.cfg.max_samples)

    def _cut(self, chunk: list[dict[str, Any]], rng: np.random.Generator | None) -> list[list[int]]:
        """A buffer's duration batches; too-short utterances are dropped, as when loading a whole corpus."""
        lengths = np.array([self._length(r) for r in chunk], dtype=np.int64)
        keep = np.flatnonzero(lengths >= 0)
        return [[int(keep[i]) for i in batch] for batch in duration_batches(lengths[keep], self.cfg.max_batch_samples, rng)]


# ------------------------------------------------------------------------------- sources
def _rows_from_manifest(path: Path, cfg: AudioDataConfig) -> Any:
    from multissl.data.audio import read_manifest

    ds = read_manifest(path, streaming=True)
    base = path.parent.resolve()

    def resolve(row: dict[str, Any]) -> dict[str, Any]:
        rel = row.get(cfg.path_column)
        if not isinstance(rel, str) or not rel.strip():
            raise DataError(f"{path}: a row without {cfg.path_column!r}: {row}")
        p = Path(rel).expanduser()
        return {"path": str(p if p.is_absolute() else base / p)}

    return ds.map(resolve)


def _rows_from_dataset(cfg: AudioDataConfig) -> Any:
    import datasets

    ds = open_dataset(cfg.dataset, split=cfg.split, streaming=True)
    if ds.features is not None:
        if cfg.audio_column not in ds.features:
            raise DataError(f"data.dataset={cfg.dataset!r}: no column {cfg.audio_column!r} "
                            f"(columns: {', '.join(ds.features)}); set data.audio_column")
        if isinstance(ds.features[cfg.audio_column], datasets.Audio):
            ds = ds.cast_column(cfg.audio_column, datasets.Audio(decode=False))
    column, name = cfg.audio_column, cfg.dataset

    def to_row(row: dict[str, Any], index: int) -> dict[str, Any]:
        value = row[column]
        blob, where = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, value)
        if isinstance(where, bytes):
            blob, where = where, None
        if blob is None and not where:
            raise DataError(f"data.dataset={name!r} row {index + 1}: column {column!r} holds neither bytes nor a path")
        path = f"{name}[{index}]:{where or ''}" if blob else str(Path(where).expanduser())
        return {"path": path, "bytes": blob, **{c: row[c] for c in OPTIONAL_COLUMNS if c in row}}

    return ds.map(to_row, with_indices=True, remove_columns=[column])


def _rows_from_files(cfg: AudioDataConfig) -> Any:
    import datasets

    from multissl.data.files import AUDIO_FILES, expand_files

    paths = [str(f.resolve()) for f in expand_files(cfg.files, AUDIO_FILES)]
    return datasets.Dataset.from_dict({"path": paths}).to_iterable_dataset(num_shards=min(len(paths), 8))


def stream_audio(cfg: AudioDataConfig) -> tuple[AudioStream, AudioStream | None]:
    """``(train, held-out)`` streams; a row is held out by the hash of its speaker, when the source
    names speakers, else of its file name (the same rule as for text streams)."""
    from multissl.data.demo import is_heldout

    if cfg.files:
        rows, description = _rows_from_files(cfg), ", ".join(cfg.files)
    elif cfg.dataset:
        rows, description = _rows_from_dataset(cfg), cfg.dataset
    elif cfg.manifest:
        rows, description = _rows_from_manifest(Path(cfg.manifest).expanduser(), cfg), cfg.manifest
    else:
        from multissl.data.speech_demo import default_speech_corpus

        rows, description = _rows_from_manifest(default_speech_corpus(), cfg), "speech demo (embedded)"
    if cfg.validation_fraction == 0:
        return AudioStream(rows, cfg, description), None
    fraction = cfg.validation_fraction

    def held(row: dict[str, Any]) -> bool:
        key = row.get("speaker")
        return is_heldout(str(key) if key not in (None, "") else Path(row["path"]).name, fraction)

    train = rows.filter(lambda r: not held(r))
    return AudioStream(train, cfg, description), AudioStream(rows.filter(held), cfg, description)
