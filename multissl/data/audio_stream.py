"""Streaming audio (``data.streaming=true``): utterances read as they come, for corpora too large
to list and probe up front (a Hub dataset, parquet shards, a long manifest).

Nothing is read before training starts. Each process reads its own part of the stream
(``split_dataset_by_node``), fills a buffer of ``data.shuffle_buffer`` utterances, reads their
durations from the headers, and cuts the buffer into duration batches under the samples budget,
as `DurationBatchSampler` does for a whole epoch. A file that cannot be read goes to the collator
with length 0, which counts and skips it like any other bad file; an utterance under
``data.min_seconds`` rides along in a batch of its buffer marked `SKIP_KEY`, so the collator counts
it without decoding it. Resume replays the stream up to
the saved batch (streams cannot seek); each batch's seed depends only on its position, so the
replayed batches are the same. The buffering, sharding, seeds and replay are the shared
`multissl.training.loader.BufferedStream` and `split_by_node`, which streamed images use too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from multissl.data.audio import (
    NAMED_IN_WARNINGS,
    OPTIONAL_COLUMNS,
    SKIP_KEY,
    AudioCollator,
    AudioDataConfig,
    AudioReport,
    UndecodableAudio,
    _probe,
    duration_batches,
    list_audio_files,
    too_short_reason,
)
from multissl.data.sources import open_dataset
from multissl.errors import DataError
from multissl.training.loader import BufferedStream, split_by_node


class AudioStream:
    """One side (train or held-out) of a streamed utterance source; `make_loader` calls `make_stream`.
    ``listed_skips`` and ``skip_dir``: as for `AudioDataset` (files left out when listing a folder)."""

    def __init__(self, source: Any, cfg: AudioDataConfig, description: str,
                 listed_skips: Sequence[tuple[str, str]] = (), skip_dir: str = "") -> None:
        self.source, self.cfg, self.description = source, cfg, description
        self.listed_skips, self.skip_dir = tuple(listed_skips), skip_dir

    def collator(self) -> AudioCollator:
        return AudioCollator.from_config(self.cfg, self.listed_skips, self.skip_dir)

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
        self._pending: list[dict[str, Any]] = []  # too-short rows waiting for a batch to ride in

    def __iter__(self) -> Iterator[tuple[list[dict[str, Any]], int]]:
        self._pending = []
        yield from super().__iter__()
        if self._pending:  # the last buffers held only too-short clips: no batch left to carry them
            names = "; ".join(str(r["path"]) for r in self._pending[:NAMED_IN_WARNINGS])
            print(f"warning: dropped {len(self._pending)} streamed utterance(s) shorter than data.min_seconds="
                  f"{self.cfg.min_seconds} at the end of the stream, uncounted: {names}", flush=True)
            self._pending = []

    def _length(self, row: dict[str, Any]) -> tuple[int, float]:
        """``(samples after resampling and cropping, seconds)``; 0 samples for a file whose header
        cannot be read (the collator names it), -1 for one under ``data.min_seconds``."""
        try:
            seconds = _probe(row["bytes"] if row.get("bytes") else row["path"], str(row["path"]))
        except UndecodableAudio:
            return 0, 0.0
        if seconds < self.cfg.min_seconds:
            return -1, seconds
        return min(math.ceil(seconds * self.cfg.sample_rate - 1e-6), self.cfg.max_samples), seconds

    def _cut(self, chunk: list[dict[str, Any]], rng: np.random.Generator | None) -> list[list[int]]:
        """A buffer's duration batches. Too-short utterances are left out of the batching, as when
        loading a whole corpus, and ride along, marked `SKIP_KEY`, in the buffer's first batch (or
        the next buffer's, when this one makes none), so the collator counts them; they are
        appended to ``chunk``'s list in place, which is what the batches index."""
        measured = [self._length(r) for r in chunk]
        lengths = np.array([n for n, _ in measured], dtype=np.int64)
        keep = np.flatnonzero(lengths >= 0)
        self._pending += [{**chunk[i], SKIP_KEY: too_short_reason(measured[i][1], self.cfg.min_seconds)}
                          for i in np.flatnonzero(lengths < 0).tolist()]
        batches = [[int(keep[i]) for i in batch] for batch in duration_batches(lengths[keep], self.cfg.max_batch_samples, rng,
                                                                                      pad_multiple=self.cfg.pad_multiple,
                                                                                      pad_cap=self.cfg.max_samples)]
        if batches and self._pending:
            first = len(chunk)
            chunk.extend(self._pending)
            batches[0] = batches[0] + list(range(first, len(chunk)))
            self._pending = []
        return batches


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


def _rows_from_files(cfg: AudioDataConfig, report: AudioReport) -> Any:
    """The listed files as a stream (dangling symlinks and undecodable formats recorded in ``report``)."""
    import datasets

    paths = [str(f) for f in list_audio_files(cfg.files, report)]
    report.warn(cfg.min_seconds)
    if not paths:
        raise DataError(f"{', '.join(cfg.files)}: no decodable audio file ({report.summary()})")
    return datasets.Dataset.from_dict({"path": paths}).to_iterable_dataset(num_shards=min(len(paths), 8))


def stream_audio(cfg: AudioDataConfig, skip_dir: str = "") -> tuple[AudioStream, AudioStream | None]:
    """``(train, held-out)`` streams; a row is held out by the hash of its speaker, when the source
    names speakers, else of its file name (the same rule as for text streams). Files listing left
    out travel with the training stream (see `AudioStream`)."""
    from multissl.data.demo import is_heldout

    report = AudioReport(strict=cfg.on_bad_audio == "error", skip_dir=skip_dir)
    if cfg.files:
        rows, description = _rows_from_files(cfg, report), ", ".join(cfg.files)
    elif cfg.dataset:
        rows, description = _rows_from_dataset(cfg), cfg.dataset
    elif cfg.manifest:
        rows, description = _rows_from_manifest(Path(cfg.manifest).expanduser(), cfg), cfg.manifest
    else:
        from multissl.data.speech_demo import default_speech_corpus

        rows, description = _rows_from_manifest(default_speech_corpus(), cfg), "speech demo (embedded)"
    skips = report.pairs()
    if cfg.validation_fraction == 0:
        return AudioStream(rows, cfg, description, skips, skip_dir), None
    fraction = cfg.validation_fraction

    def held(row: dict[str, Any]) -> bool:
        key = row.get("speaker")
        return is_heldout(str(key) if key not in (None, "") else Path(row["path"]).name, fraction)

    train = rows.filter(lambda r: not held(r))
    return AudioStream(train, cfg, description, skips, skip_dir), AudioStream(rows.filter(held), cfg, description)
