"""Audio data for wav2vec 2.0-style pretraining: sources -> probed utterances -> duration batches.

Loading only reads headers (``soundfile.info``) to learn each utterance's duration, once; decoding
(``soundfile`` + torchaudio resampling), random cropping and normalisation happen in the collator,
inside DataLoader workers. `datasets`' ``Audio`` feature and ``audiofolder`` are avoided on purpose:
they need torchcodec and FFmpeg's shared libraries, and soundfile is faster on WAV.

Batches are formed by `DurationBatchSampler` under a budget of padded samples (fairseq's
``max_tokens``), from utterances of similar length, so padding stays small.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from multissl.data.files import AUDIO_FILES, MANIFEST_FILES, check_table, expand_files, read_files
from multissl.data.sources import open_dataset
from multissl.errors import ConfigError, DataError, first_line
from multissl.training.loader import DatasetView, ShardedBatches, batch_seed

OPTIONAL_COLUMNS = ("transcript", "speaker", "label")
SILENCE_PEAK = 1e-4  # |sample| peak below this (-80 dBFS, ~3 LSB of 16-bit) = a silent file
NAMED_IN_WARNINGS = 3


@dataclass
class AudioDataConfig:
    """Where the audio comes from and how utterances become batches."""

    files: list[str] = field(default_factory=list)
    """Audio files or folders (searched recursively) of .wav .flac .ogg .mp3."""
    manifest: str = ""
    """A .csv/.tsv/.jsonl/.json/.parquet with a path column (relative to the manifest) and optional
    transcript/speaker/label."""
    dataset: str = ""
    """A Hub dataset id or local dataset folder whose audio column holds bytes or paths."""
    split: str = "train"
    """Split of `dataset` to load."""
    audio_column: str = "audio"
    """Column of `dataset` with the audio (``{"bytes", "path"}`` dicts, bytes, or paths)."""
    path_column: str = "path"
    """Column of `manifest` with the audio file paths."""
    sample_rate: int = 16000
    """Rate the model expects; other rates are resampled when decoded."""
    max_seconds: float = 15.6
    """Longer utterances are randomly cropped to this (wav2vec 2.0's 15.6 s)."""
    min_seconds: float = 1.0
    """Shorter utterances are dropped when loading."""
    normalize: bool = True
    """Zero mean, unit variance per utterance (what Wav2Vec2FeatureExtractor's do_normalize does)."""
    max_batch_samples: int = 1_400_000
    """Budget of padded samples per batch (longest x count), like fairseq's max_tokens (1.4M a GPU)."""
    on_bad_audio: Literal["skip", "error"] = "skip"
    """Count and skip an unreadable or silent file with a warning, or stop with an error naming it."""
    validation_fraction: float = 0.05
    """Share held out for eval: whole speakers when a speaker column exists, else by path hash."""
    streaming: bool = False
    """Read utterances as they come instead of listing and probing them all first (needs trainer.max_steps)."""
    shuffle_buffer: int = 2000
    """Streaming: utterances buffered, shuffled and cut into duration batches together."""

    def __post_init__(self) -> None:
        if sum(bool(x) for x in (self.files, self.manifest, self.dataset)) > 1:
            raise ConfigError("set at most one of data.files, data.manifest and data.dataset")
        if self.sample_rate <= 0:
            raise ConfigError(f"data.sample_rate must be positive, got {self.sample_rate}")
        if self.max_seconds <= 0:
            raise ConfigError(f"data.max_seconds must be positive, got {self.max_seconds}")
        if self.min_seconds < 0:
            raise ConfigError(f"data.min_seconds must be >= 0, got {self.min_seconds}")
        if self.max_batch_samples < self.max_samples:
            raise ConfigError(
                f"data.max_batch_samples={self.max_batch_samples} is below one cropped utterance "
                f"(data.max_seconds={self.max_seconds} x data.sample_rate={self.sample_rate} = {self.max_samples})"
            )
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}")

    @property
    def max_samples(self) -> int:
        return int(self.max_seconds * self.sample_rate)


# ------------------------------------------------------------------------------- decoding
class BadAudio(DataError):
    """A file that cannot be used; the collator counts and skips it (or stops, when asked)."""


class UndecodableAudio(BadAudio):
    """Not audio, truncated, empty, or holding non-finite samples."""


class SilentAudio(BadAudio):
    """Decodes, but every sample is (nearly) zero: useless for contrastive learning, and it makes
    normalisation divide by ~0."""


@functools.lru_cache(maxsize=16)
def _resampler(orig: int, new: int) -> Any:
    """One torchaudio resampler per rate pair: its sinc kernel is built once, not per file."""
    import torchaudio

    return torchaudio.transforms.Resample(orig, new)


def load_audio(source: str | Path | bytes, target_rate: int, name: str | None = None) -> np.ndarray:
    """Decode to float32 mono at ``target_rate`` (channels averaged), or raise a `BadAudio` naming it."""
    import soundfile as sf

    name = name or (str(source) if not isinstance(source, bytes) else "<audio bytes>")
    try:
        with sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as f:
            rate = f.samplerate
            data = f.read(dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile reports every failure as one of several types
        raise UndecodableAudio(f"{name}: cannot decode audio ({first_line(err)})") from None
    if data.shape[0] == 0:
        raise UndecodableAudio(f"{name}: holds no audio samples")
    x = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)
    peak = float(np.max(np.abs(x)))
    if not math.isfinite(peak):
        raise UndecodableAudio(f"{name}: holds non-finite samples")
    if peak < SILENCE_PEAK:
        raise SilentAudio(f"{name}: is silent (peak {peak:.1e})")
    if rate != target_rate:
        x = _resampler(rate, target_rate)(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


class AudioCollator:
    """``(samples, generator) -> {"input_values", "attention_mask", "lengths", "skipped", "kept"}``,
    padded to the longest; ``kept`` are the indices (into ``samples``) of the utterances in the batch,
    so task collators can keep their labels aligned when a bad file is skipped.

    Bad files are skipped with a warning for the first few (per DataLoader worker) and counted twice:
    in ``skipped`` (this copy of the collator) and in the batch's ``skipped`` entry, which travels to
    the trainer, so the total over workers and processes can be logged.
    """

    def __init__(self, sample_rate: int = 16000, max_seconds: float = 15.6, normalize: bool = True,
                 on_bad_audio: Literal["skip", "error"] = "skip") -> None:
        self.sample_rate, self.max_samples = sample_rate, int(max_seconds * sample_rate)
        self.normalize, self.on_bad_audio = normalize, on_bad_audio
        self.skipped = 0
        self.skipped_files: list[str] = []

    @classmethod
    def from_config(cls, cfg: AudioDataConfig) -> AudioCollator:
        return cls(cfg.sample_rate, cfg.max_seconds, cfg.normalize, cfg.on_bad_audio)

    def _skip(self, err: BadAudio) -> None:
        self.skipped += 1
        if len(self.skipped_files) < NAMED_IN_WARNINGS:
            self.skipped_files.append(str(err))
            print(f"warning: skipping bad audio ({self.skipped} so far): {err}", flush=True)

    def __call__(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        # One draw per sample, up front: a crop depends on the batch seed alone, not on which files fail.
        offsets = torch.rand(len(samples), generator=generator, dtype=torch.float64).tolist()
        waves: list[np.ndarray] = []
        kept: list[int] = []
        first_error: BadAudio | None = None
        skipped = 0
        for index, (sample, u) in enumerate(zip(samples, offsets)):
            raw = sample.get("bytes")
            try:
                x = load_audio(raw if raw else sample["path"], self.sample_rate, name=sample["path"])
            except BadAudio as err:
                if self.on_bad_audio == "error":
                    raise BadAudio(str(err)) from None
                first_error = first_error or err
                self._skip(err)
                skipped += 1
                continue
            if len(x) > self.max_samples:
                start = int(u * (len(x) - self.max_samples + 1))
                x = x[start : start + self.max_samples]
            waves.append(x)
            kept.append(index)
        if not waves:
            raise DataError(f"none of the {len(samples)} utterances in a batch could be used, e.g. {first_error}")
        lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
        values = torch.zeros(len(waves), int(lengths.max()))
        for i, w in enumerate(waves):
            values[i, : len(w)] = torch.from_numpy(w)
        mask = torch.arange(values.shape[1])[None, :] < lengths[:, None]
        if self.normalize:
            m = mask.double()
            v = values.double()
            mean = (v * m).sum(1, keepdim=True) / lengths[:, None]
            var = (((v - mean) * m) ** 2).sum(1, keepdim=True) / lengths[:, None]
            values = ((v - mean) / torch.sqrt(var + 1e-7) * m).float()
        return {"input_values": values, "attention_mask": mask.long(), "lengths": lengths,
                "skipped": torch.tensor(skipped), "kept": torch.tensor(kept, dtype=torch.long)}


# ------------------------------------------------------------------------------- batching
def duration_batches(lengths: np.ndarray, max_batch_samples: int, rng: np.random.Generator | None,
                     bucket_width: float = 0.05) -> list[list[int]]:
    """Indices cut into batches whose padded size (longest x count) fits ``max_batch_samples``.

    With ``rng``: shuffled within log-spaced length buckets (``bucket_width`` apart), ordered by
    bucket, cut greedily, then the batch order shuffled. Without: in length order (eval).
    """
    if rng is not None:
        buckets = np.floor(np.log(np.maximum(lengths, 1)) / math.log1p(bucket_width)).astype(np.int64)
        perm = rng.permutation(len(lengths))
        order = perm[np.argsort(buckets[perm], kind="stable")]
    else:
        order = np.argsort(lengths, kind="stable")
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order.tolist():
        n = int(lengths[i])
        if current and max(longest, n) * (len(current) + 1) > max_batch_samples:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class DurationBatchSampler(ShardedBatches):
    """This process's batches of ``(index, batch_seed)``, built from utterances of similar length.

    Per epoch, utterances are shuffled within log-spaced length buckets (``bucket_width`` apart),
    ordered by bucket and cut greedily into batches whose padded size (longest x count) fits
    ``max_batch_samples``; the batch order is then shuffled from ``(seed, epoch)``. Global batch
    ``b`` goes to process ``b % world_size``; training drops the last few so that every process
    gets the same count, eval keeps every utterance exactly once (in length order, unshuffled).
    The batch count can differ by one or two between epochs, as the composition changes.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        max_batch_samples: int,
        *,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
        split_tag: int = 0,
        bucket_width: float = 0.05,
    ) -> None:
        super().__init__(seed=seed, shuffle=shuffle, drop_last=drop_last, rank=rank, world_size=world_size,
                         split_tag=split_tag)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) == 0:
            raise ValueError("cannot batch an empty dataset")
        if self.lengths.max() > max_batch_samples:
            raise ValueError(f"an utterance of {self.lengths.max()} samples exceeds max_batch_samples={max_batch_samples}")
        self.max_batch_samples, self.bucket_width = max_batch_samples, bucket_width

    def _make_batches(self) -> list[list[int]]:
        rng = np.random.default_rng(batch_seed(self.seed, self.split_tag, self.epoch)) if self.shuffle else None
        return duration_batches(self.lengths, self.max_batch_samples, rng, self.bucket_width)

    def padding_fraction(self) -> float:
        """Share of padded samples in this epoch's batches (over all processes)."""
        padded = real = 0
        for batch in self.global_batches():
            lens = self.lengths[batch]
            padded += int(lens.max()) * len(batch)
            real += int(lens.sum())
        return 1.0 - real / padded


class AudioDataset(DatasetView):
    """A `datasets.Dataset` of utterances (``path``, ``duration``, ...) that batches itself by duration.

    `make_loader` calls `make_batch_sampler` instead of using fixed-size batches.
    """

    def __init__(self, data: Any, cfg: AudioDataConfig) -> None:
        super().__init__(data)
        self.cfg = cfg
        rate = cfg.sample_rate
        durations = np.asarray(data["duration"], dtype=np.float64)
        # Length after resampling (torchaudio rounds up) and cropping: what the collator will produce.
        self.lengths = np.minimum(np.ceil(durations * rate - 1e-6).astype(np.int64), cfg.max_samples)

    def collator(self) -> AudioCollator:
        return AudioCollator.from_config(self.cfg)

    def make_batch_sampler(self, *, batch_size: int, seed: int, shuffle: bool, drop_last: bool,
                           rank: int, world_size: int, split_tag: int) -> DurationBatchSampler:
        """``batch_size`` is ignored: the samples budget (``max_batch_samples``) sizes the batches."""
        return DurationBatchSampler(
            self.lengths, self.cfg.max_batch_samples, seed=seed, shuffle=shuffle, drop_last=drop_last,
            rank=rank, world_size=world_size, split_tag=split_tag,
        )


# ------------------------------------------------------------------------------- loading
def read_manifest(path: Path, streaming: bool) -> Any:
    """A manifest (a table file) through `datasets`, or a `DataError` naming what is wrong with it."""
    check_table(path, MANIFEST_FILES, "data.manifest")
    return read_files([path], "data.manifest", streaming=streaming)


def _load_manifest(path: Path, cfg: AudioDataConfig) -> dict[str, list[Any]]:
    """Columns of a manifest, paths made absolute; a missing file is an error naming its row."""
    ds = read_manifest(path, streaming=False)
    if cfg.path_column not in ds.column_names:
        raise DataError(f"{path}: no column {cfg.path_column!r} (columns: {', '.join(ds.column_names)}); set data.path_column")
    base = path.parent
    paths = []
    for row, rel in enumerate(ds[cfg.path_column], start=1):
        if not isinstance(rel, str) or not rel.strip():
            raise DataError(f"{path}: row {row}: empty {cfg.path_column!r}")
        p = Path(rel).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            raise DataError(f"{path}: row {row}: no such audio file: {p}")
        paths.append(str(p.resolve()))
    cols: dict[str, list[Any]] = {"path": paths}
    cols.update({c: list(ds[c]) for c in OPTIONAL_COLUMNS if c in ds.column_names})
    return cols


def _load_dataset_source(cfg: AudioDataConfig) -> dict[str, list[Any]]:
    """Columns of a Hub/local dataset: ``path`` (a file or a name for embedded bytes), maybe ``bytes``."""
    import datasets

    ds = open_dataset(cfg.dataset, split=cfg.split)
    if cfg.audio_column not in ds.column_names:
        raise DataError(f"data.dataset={cfg.dataset!r}: no column {cfg.audio_column!r} (columns: {', '.join(ds.column_names)}); set data.audio_column")
    if isinstance(ds.features[cfg.audio_column], datasets.Audio):
        ds = ds.cast_column(cfg.audio_column, datasets.Audio(decode=False))  # raw bytes/paths, no torchcodec
    paths: list[str] = []
    blobs: list[bytes | None] = []
    for i, value in enumerate(ds[cfg.audio_column]):
        blob, where = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, value)
        if isinstance(where, bytes):
            blob, where = where, None
        if blob is None and not where:
            raise DataError(f"data.dataset={cfg.dataset!r} row {i + 1}: column {cfg.audio_column!r} holds neither bytes nor a path")
        paths.append(f"{cfg.dataset}[{i}]:{where or ''}" if blob else str(Path(where).expanduser().resolve()))
        blobs.append(blob)
    cols: dict[str, list[Any]] = {"path": paths}
    if any(b is not None for b in blobs):
        cols["bytes"] = blobs
    cols.update({c: list(ds[c]) for c in OPTIONAL_COLUMNS if c in ds.column_names})
    return cols


def _probe(source: str | bytes) -> float:
    """Duration in seconds from the header alone; raises `UndecodableAudio`."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Exception as err:
        raise UndecodableAudio(first_line(err)) from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise UndecodableAudio("holds no audio samples")
    return info.frames / info.samplerate


def load_utterances(cfg: AudioDataConfig) -> tuple[Any, str]:
    """A `datasets.Dataset` with ``path``, ``duration`` (and transcript/speaker/label when given) and
    a description of the source; unprobeable files are skipped with one warning (or an error)."""
    import datasets

    if cfg.files:
        paths = [str(f.resolve()) for f in expand_files(cfg.files, AUDIO_FILES)]
        cols, source = {"path": paths}, ", ".join(cfg.files)
    elif cfg.dataset:
        cols, source = _load_dataset_source(cfg), cfg.dataset
    else:
        if cfg.manifest:
            manifest, source = Path(cfg.manifest).expanduser(), cfg.manifest
        else:
            from multissl.data.speech_demo import default_speech_corpus

            manifest, source = default_speech_corpus(), "speech demo (embedded)"
        cols = _load_manifest(manifest, cfg)
    blobs = cols.get("bytes")
    durations: list[float] = []
    keep: list[int] = []
    bad: list[str] = []
    for i, path in enumerate(cols["path"]):
        try:
            durations.append(_probe(blobs[i] if blobs and blobs[i] is not None else path))
            keep.append(i)
        except UndecodableAudio as err:
            if cfg.on_bad_audio == "error":
                raise UndecodableAudio(f"{path}: cannot read audio ({err})") from None
            bad.append(f"{path} ({err})")
    if bad:
        print(f"warning: skipping {len(bad)} unreadable audio file(s) of {len(cols['path'])}: {'; '.join(bad[:NAMED_IN_WARNINGS])}"
              + (" ..." if len(bad) > NAMED_IN_WARNINGS else ""), flush=True)
    long_enough = [(i, d) for i, d in zip(keep, durations) if d >= cfg.min_seconds]
    if not long_enough:
        why = f"no readable audio file of at least data.min_seconds={cfg.min_seconds}" if keep else "no readable audio file"
        raise DataError(f"{source}: {why} (of {len(cols['path'])})")
    rows = [i for i, _ in long_enough]
    out = {name: [values[i] for i in rows] for name, values in cols.items()}
    out["duration"] = [d for _, d in long_enough]
    return datasets.Dataset.from_dict(out), source
