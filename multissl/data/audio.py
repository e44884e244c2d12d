"""Audio data for wav2vec 2.0-style pretraining: sources -> probed utterances -> duration batches.

Loading only reads headers (``soundfile.info``) to learn each utterance's duration, once; decoding
(``soundfile`` + torchaudio resampling), random cropping and normalisation happen in the collator,
inside DataLoader workers. `datasets`' ``Audio`` feature and ``audiofolder`` are avoided on purpose:
they need torchcodec and FFmpeg's shared libraries, and soundfile is faster on WAV.

Batches are formed by `DurationBatchSampler` under a budget of padded samples (fairseq's
``max_tokens``), from utterances of similar length, so padding stays small.

Every audio file a run cannot use is counted once, with its reason, whatever stage rejects it:
listing (a dangling symlink, a format libsndfile cannot decode, such as .m4a), probing (an empty,
header-only or unreadable file), the ``data.min_seconds`` filter, and decoding in the collator (a
silent or corrupt file). `AudioReport` warns about the first three when the data are prepared; the
collator names its rejects in each batch (``skip_reasons``), and `AudioSkips` (in the objective, in
the main process) keeps one set of them all: the run's ``data/skipped_audio_files`` total counts
distinct files, and ``output_dir/data/skipped_audio_files`` lists them. Files in a data folder that
are not audio at all (transcripts, metadata, .DS_Store) are not inputs, so they are ignored.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from multissl.data.files import MANIFEST_FILES, SkipWarnings, check_table, read_files, write_skip_list
from multissl.data.sources import open_dataset
from multissl.errors import ConfigError, DataError, first_line
from multissl.training.loader import DatasetView, ShardedBatches, batch_seed
from multissl.training.skips import BadInputs, skip_id

OPTIONAL_COLUMNS = ("transcript", "speaker", "label")
SILENCE_PEAK = 1e-4  # |sample| peak below this (-80 dBFS, ~3 LSB of 16-bit) = a silent file
NAMED_IN_WARNINGS = 3
SKIP_LIST = "skipped_audio_files"
"""``output_dir/data/<this>``: every audio file a run could not use, once, as ``path<TAB>reason``."""
SKIP_KEY = "_skip_reason"
"""A row carrying this key is counted as skipped by the collator without being decoded (streamed
utterances under ``data.min_seconds``: the stream only sees them after batches are cut)."""

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd",
                    ".caf", ".w64", ".rf64")
"""What libsndfile (inside the soundfile wheel) decodes: WAV, FLAC, Ogg Vorbis/Opus, MP3, AIFF, AU,
CAF, Wave64, RF64."""
UNSUPPORTED_AUDIO = {
    ".m4a": "MPEG-4 audio: AAC or ALAC", ".mp4": "MPEG-4", ".aac": "AAC", ".wma": "Windows Media Audio",
    ".webm": "WebM", ".mka": "Matroska audio", ".ac3": "Dolby AC-3", ".amr": "AMR", ".ape": "Monkey's Audio",
    ".wv": "WavPack", ".3gp": "3GPP", ".ra": "RealAudio", ".mpc": "Musepack", ".spx": "Speex", ".tta": "True Audio",
    ".dts": "DTS", ".mid": "MIDI: notes, not sound", ".midi": "MIDI: notes, not sound",
}
"""Audio formats libsndfile cannot decode: such files are counted and skipped, naming the format."""

DANGLING, UNSUPPORTED, UNREADABLE, TOO_SHORT = "dangling", "unsupported", "unreadable", "too short"


@dataclass
class AudioDataConfig:
    """Where the audio comes from and how utterances become batches."""

    files: list[str] = field(default_factory=list)
    """Audio files or folders (searched recursively): .wav .flac .ogg .opus .mp3 .aiff .au .caf .w64 .rf64.
    Dangling symlinks and formats libsndfile cannot decode (.m4a, .aac, .wma, ...) are counted and
    skipped; other files in the folders (not audio) are ignored."""
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
    """Shorter utterances are left out (counted, listed in output_dir/data/skipped_audio_files)."""
    normalize: bool = True
    """Zero mean, unit variance per utterance (what Wav2Vec2FeatureExtractor's do_normalize does)."""
    max_batch_samples: int = 1_400_000
    """Budget of padded samples per batch (padded length x count), like fairseq's max_tokens (1.4M a GPU)."""
    pad_multiple_seconds: float = 0.5
    """Pad each batch to a multiple of this many seconds (at most data.max_seconds; 0: to its longest
    utterance). Few distinct batch shapes let the allocator and oneDNN reuse what they made for an
    earlier batch: on the tiny wav2vec 2.0 preset (2 CPU threads) peak RSS fell from 2.45-2.53 GB to
    1.84 GB with throughput unchanged or higher (README, Speed)."""
    on_bad_audio: Literal["skip", "error"] = "skip"
    """Count and skip an unreadable, silent or undecodable file (or a dangling symlink) with a warning,
    or stop with an error naming it. Clips under data.min_seconds are always skipped, never an error."""
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
        if self.pad_multiple_seconds < 0:
            raise ConfigError(f"data.pad_multiple_seconds must be >= 0, got {self.pad_multiple_seconds}")

    @property
    def max_samples(self) -> int:
        return int(self.max_seconds * self.sample_rate)

    @property
    def pad_multiple(self) -> int:
        return round(self.pad_multiple_seconds * self.sample_rate)


def padded_length(longest: int, multiple: int, cap: int = 0) -> int:
    """``longest`` rounded up to a multiple of ``multiple`` (0: as it is), but not past ``cap`` (the
    crop length; 0: no cap) unless ``longest`` already is."""
    if multiple <= 0:
        return longest
    rounded = -(-longest // multiple) * multiple
    return min(rounded, max(cap, longest)) if cap > 0 else rounded


# ------------------------------------------------------------------------------- decoding
class BadAudio(DataError):
    """A file that cannot be used; the collator counts and skips it (or stops, when asked). ``name``
    and ``reason`` are kept apart for the skip list."""

    def __init__(self, name: str, reason: str = "") -> None:  # one argument: torch re-raising a worker's error
        super().__init__(f"{name}: {reason}" if reason else name)
        self.name, self.reason = name, reason

    def __reduce__(self) -> tuple[Any, ...]:  # raised in a DataLoader worker, re-raised in the main process
        return type(self), (self.name, self.reason)


class UndecodableAudio(BadAudio):
    """Not audio, truncated, empty, or holding non-finite samples."""


class SilentAudio(BadAudio):
    """Decodes, but every sample is (nearly) zero: useless for contrastive learning, and it makes
    normalisation divide by ~0."""


def _libsndfile_reason(err: BaseException) -> str:
    """libsndfile's own reason ("Format not recognised"), without the path its message repeats."""
    reason = getattr(err, "error_string", None)
    return reason.strip().rstrip(".") if isinstance(reason, str) and reason.strip() else first_line(err)


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
        raise UndecodableAudio(name, f"cannot decode audio ({_libsndfile_reason(err)})") from None
    if data.shape[0] == 0:
        raise UndecodableAudio(name, "holds no audio samples")
    x = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)
    peak = float(np.max(np.abs(x)))
    if not math.isfinite(peak):
        raise UndecodableAudio(name, "holds non-finite samples")
    if peak < SILENCE_PEAK:
        raise SilentAudio(name, f"is silent (peak {peak:.1e})")
    if rate != target_rate:
        x = _resampler(rate, target_rate)(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


class AudioCollator:
    """``(samples, generator) -> {"input_values", "attention_mask", "lengths", "skipped", "skip_reasons",
    "kept"}``, padded to the longest; ``kept`` are the indices (into ``samples``) of the utterances in
    the batch, so task collators can keep their labels aligned when a bad file is skipped.

    Bad files are skipped with a warning for the first few (per DataLoader worker). The batch names
    them in ``skip_reasons`` (``(path, reason)`` pairs) and counts them in ``skipped``: a worker cannot
    know what other workers met, so `AudioSkips` dedupes them in the main process. Rows marked with
    `SKIP_KEY` (streamed clips under ``data.min_seconds``) are passed on as skips without decoding.

    ``listed_skips`` are the files left out when the data were listed and probed, and ``skip_dir``
    the output folder of their list; the collator only carries them to the objective's `AudioSkips`.
    """

    def __init__(self, sample_rate: int = 16000, max_seconds: float = 15.6, normalize: bool = True,
                 on_bad_audio: Literal["skip", "error"] = "skip",
                 listed_skips: Sequence[tuple[str, str]] = (), skip_dir: str = "", pad_multiple: int = 0) -> None:
        self.sample_rate, self.max_samples = sample_rate, int(max_seconds * sample_rate)
        self.pad_multiple = pad_multiple
        self.normalize, self.on_bad_audio = normalize, on_bad_audio
        self.listed_skips, self.skip_dir = tuple(listed_skips), skip_dir
        self.warnings = SkipWarnings("audio", NAMED_IN_WARNINGS)

    @classmethod
    def from_config(cls, cfg: AudioDataConfig, listed_skips: Sequence[tuple[str, str]] = (),
                    skip_dir: str = "") -> AudioCollator:
        return cls(cfg.sample_rate, cfg.max_seconds, cfg.normalize, cfg.on_bad_audio, listed_skips, skip_dir,
                   cfg.pad_multiple)

    def _skip(self, err: BadAudio) -> None:
        self.warnings.skip(err)

    def __call__(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, Any]:
        real = [i for i, s in enumerate(samples) if SKIP_KEY not in s]
        reasons = [(str(s["path"]), str(s[SKIP_KEY])) for s in samples if SKIP_KEY in s]
        # One draw per utterance, up front: a crop depends on the batch seed alone, not on which files fail.
        offsets = torch.rand(len(real), generator=generator, dtype=torch.float64).tolist()
        waves: list[np.ndarray] = []
        kept: list[int] = []
        first_error: BadAudio | None = None
        for index, u in zip(real, offsets):
            sample = samples[index]
            raw = sample.get("bytes")
            try:
                x = load_audio(raw if raw else sample["path"], self.sample_rate, name=sample["path"])
            except BadAudio as err:
                if self.on_bad_audio == "error":
                    raise type(err)(err.name, err.reason) from None
                first_error = first_error or err
                self._skip(err)
                reasons.append((err.name, err.reason))
                continue
            if len(x) > self.max_samples:
                start = int(u * (len(x) - self.max_samples + 1))
                x = x[start : start + self.max_samples]
            waves.append(x)
            kept.append(index)
        if not waves:
            raise DataError(f"none of the {len(real)} utterances in a batch could be used, e.g. {first_error}")
        lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
        values = torch.zeros(len(waves), padded_length(int(lengths.max()), self.pad_multiple, self.max_samples))
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
                "skipped": torch.tensor(len(reasons)), "skip_reasons": reasons,
                "kept": torch.tensor(kept, dtype=torch.long)}


class AudioSkips:
    """The audio files a run could not use, each once with its reason: what an audio objective's
    ``count`` reports as ``skipped_audio_files`` (the run's total is then the number of distinct
    files, however often a bad one is drawn, in whichever DataLoader worker) and what
    ``output_dir/data/skipped_audio_files`` lists.

    Files left out when the data were listed and probed (``collate.listed_skips``) are the same on
    every process, so process 0 alone counts them, with its first batch. Files the collator rejects
    come in batches (``skip_reasons``); eval batches are noted from ``compute`` (`note`) and counted
    with the next training batch. The set survives a resume through the objective's ``state_dict``.
    Process 0 writes the list (when the data were prepared with an ``output_dir``) of the files it
    met; the count is over every process, each file once (the trainer unions their ids).
    """

    def __init__(self, collate: Any = None) -> None:
        self.listed: tuple[tuple[str, str], ...] = tuple(getattr(collate, "listed_skips", ()))
        self.skip_dir: str = getattr(collate, "skip_dir", "") or ""
        self.rank = 0
        self.reasons: dict[str, str] = {}
        self.counted = 0
        self._started = False

    def setup(self, rank: int) -> None:
        """From ``Objective.setup``: which process this is. Clears a stale list of an earlier run."""
        self.rank = rank
        self._started = False
        self._start()

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        if self.rank == 0:
            for path, why in self.listed:
                self.reasons.setdefault(path, why)
        self._write()

    def _write(self) -> None:
        if self.rank == 0 and self.skip_dir:
            write_skip_list(self.skip_dir, SKIP_LIST, self.lines())

    def lines(self) -> list[str]:
        """``path<TAB>reason``, in the order the files were met."""
        return [f"{path}\t{why}" for path, why in self.reasons.items()]

    def note(self, batch: dict[str, Any]) -> None:
        """Remember the batch's rejects (eval batches, whose units the trainer does not count)."""
        self._start()
        fresh = [(str(p), str(why)) for p, why in batch.get("skip_reasons", ()) if str(p) not in self.reasons]
        if fresh:
            self.reasons.update(fresh)
            self._write()

    def count(self, batch: dict[str, Any]) -> BadInputs | int:
        """The files not reported before by this process (the batch's new rejects, plus any noted
        since the last count), by id: the trainer counts each once over every process."""
        if "skip_reasons" not in batch:  # a collator that does not name its rejects: count them as they come
            self._start()
            return int(batch.get("skipped", 0))
        self.note(batch)
        paths = list(self.reasons)[self.counted:]
        self.counted = len(self.reasons)
        return BadInputs(tuple(skip_id(p) for p in paths))

    def state_dict(self) -> dict[str, Any]:
        return {"files": [[p, why] for p, why in self.reasons.items()], "counted": self.counted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # a checkpoint of an earlier version
            return
        self.reasons = {str(p): str(why) for p, why in state.get("files", [])}
        self.counted = int(state.get("counted", len(self.reasons)))
        self._started = False
        self._start()  # files newly found unusable by this run's listing are counted from here


# ------------------------------------------------------------------------------- batching
def duration_batches(lengths: np.ndarray, max_batch_samples: int, rng: np.random.Generator | None,
                     bucket_width: float = 0.05, pad_multiple: int = 0, pad_cap: int = 0) -> list[list[int]]:
    """Indices cut into batches whose padded size (the longest, rounded up as the collator does:
    `padded_length` with ``pad_multiple`` and ``pad_cap``, x count) fits ``max_batch_samples``.

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
        if current and padded_length(max(longest, n), pad_multiple, pad_cap) * (len(current) + 1) > max_batch_samples:
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
        pad_multiple: int = 0,
        pad_cap: int = 0,
    ) -> None:
        super().__init__(seed=seed, shuffle=shuffle, drop_last=drop_last, rank=rank, world_size=world_size,
                         split_tag=split_tag)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) == 0:
            raise ValueError("cannot batch an empty dataset")
        if self.lengths.max() > max_batch_samples:
            raise ValueError(f"an utterance of {self.lengths.max()} samples exceeds max_batch_samples={max_batch_samples}")
        self.max_batch_samples, self.bucket_width = max_batch_samples, bucket_width
        self.pad_multiple, self.pad_cap = pad_multiple, pad_cap

    def _make_batches(self) -> list[list[int]]:
        rng = np.random.default_rng(batch_seed(self.seed, self.split_tag, self.epoch)) if self.shuffle else None
        return duration_batches(self.lengths, self.max_batch_samples, rng, self.bucket_width, self.pad_multiple,
                                self.pad_cap)

    def padding_fraction(self) -> float:
        """Share of padded samples in this epoch's batches (over all processes)."""
        padded = real = 0
        for batch in self.global_batches():
            lens = self.lengths[batch]
            padded += padded_length(int(lens.max()), self.pad_multiple, self.pad_cap) * len(batch)
            real += int(lens.sum())
        return 1.0 - real / padded


class AudioDataset(DatasetView):
    """A `datasets.Dataset` of utterances (``path``, ``duration``, ...) that batches itself by duration.

    `make_loader` calls `make_batch_sampler` instead of using fixed-size batches. ``listed_skips``
    (the files loading left out) and ``skip_dir`` (the output folder of their list) travel with the
    training split to its collator, and on to the objective's `AudioSkips`; `with_data` keeps them.
    """

    def __init__(self, data: Any, cfg: AudioDataConfig, listed_skips: Sequence[tuple[str, str]] = (),
                 skip_dir: str = "") -> None:
        super().__init__(data)
        self.cfg = cfg
        self.listed_skips, self.skip_dir = tuple(listed_skips), skip_dir
        rate = cfg.sample_rate
        durations = np.asarray(data["duration"], dtype=np.float64)
        # Length after resampling (torchaudio rounds up) and cropping: what the collator will produce.
        self.lengths = np.minimum(np.ceil(durations * rate - 1e-6).astype(np.int64), cfg.max_samples)

    def collator(self) -> AudioCollator:
        return AudioCollator.from_config(self.cfg, self.listed_skips, self.skip_dir)

    def with_data(self, data: Any) -> AudioDataset:
        """The same utterance set's record of skips over other rows (a selection, added columns)."""
        return AudioDataset(data, self.cfg, self.listed_skips, self.skip_dir)

    def make_batch_sampler(self, *, batch_size: int, seed: int, shuffle: bool, drop_last: bool,
                           rank: int, world_size: int, split_tag: int) -> DurationBatchSampler:
        """``batch_size`` is ignored: the samples budget (``max_batch_samples``) sizes the batches."""
        return DurationBatchSampler(
            self.lengths, self.cfg.max_batch_samples, seed=seed, shuffle=shuffle, drop_last=drop_last,
            rank=rank, world_size=world_size, split_tag=split_tag, pad_multiple=self.cfg.pad_multiple,
            pad_cap=self.cfg.max_samples,
        )


# ------------------------------------------------------------------------------- loading
def read_manifest(path: Path, streaming: bool) -> Any:
    """A manifest (a table file) through `datasets`, or a `DataError` naming what is wrong with it."""
    check_table(path, MANIFEST_FILES, "data.manifest")
    return read_files([path], "data.manifest", streaming=streaming)


def _csv_row_lines(path: Path) -> Iterable[int]:
    """The line (from 1, as an editor numbers them) on which each data row of a CSV/TSV starts:
    after the header, blank lines skipped (as the CSV reader does), quoted line breaks followed."""
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        previous, header = 0, True
        for record in reader:
            start, previous = previous + 1, reader.line_num
            if not record:
                continue
            if header:
                header = False
                continue
            yield start


def _json_row_lines(path: Path) -> Iterable[int]:
    """The line each row of a .jsonl (or a .json array) starts on; blank lines skipped, as read."""
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    if text.lstrip().startswith("["):  # one JSON array of objects
        decoder, at = json.JSONDecoder(), text.index("[") + 1
        while True:
            while at < len(text) and text[at] in " \t\r\n,":
                at += 1
            if at >= len(text) or text[at] == "]":
                return
            yield text.count("\n", 0, at) + 1
            try:
                at = decoder.raw_decode(text, at)[1]
            except json.JSONDecodeError:
                return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number


def manifest_place(path: Path, row: int) -> str:
    """``line N`` for the ``row``-th (from 1) row of a manifest, the line an editor shows it on (the
    header counts in a CSV, blank lines count everywhere); ``row N`` where the format has no lines
    (parquet) or the line cannot be found. Only computed for an error: it reads the file again."""
    suffix = path.suffix.lower()
    finder = _csv_row_lines if suffix in (".csv", ".tsv") else _json_row_lines if suffix in (".jsonl", ".json") else None
    if finder is not None:
        try:
            for index, line in enumerate(finder(path), start=1):
                if index == row:
                    return f"line {line}"
        except (OSError, csv.Error):
            pass
    return f"row {row}"


def _missing_file(p: Path) -> str:
    """Why a listed path is not a file, in words: missing, a dangling symlink, or a folder."""
    if p.is_symlink() and not p.exists():
        return f"dangling symlink (to {os.readlink(p)}): {p}"
    if p.is_dir():
        return f"a folder, not an audio file: {p}"
    return f"no such audio file: {p}"


def _load_manifest(path: Path, cfg: AudioDataConfig) -> dict[str, list[Any]]:
    """Columns of a manifest, paths made absolute; a missing file is an error naming its line."""
    ds = read_manifest(path, streaming=False)
    if cfg.path_column not in ds.column_names:
        raise DataError(f"{path}: no column {cfg.path_column!r} (columns: {', '.join(ds.column_names)}); set data.path_column")
    base = path.parent
    paths = []
    for row, rel in enumerate(ds[cfg.path_column], start=1):
        if not isinstance(rel, str) or not rel.strip():
            raise DataError(f"{path}: {manifest_place(path, row)}: empty {cfg.path_column!r}")
        p = Path(rel).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            raise DataError(f"{path}: {manifest_place(path, row)}: {_missing_file(p)}")
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


@dataclass
class AudioReport:
    """What loading left out, one entry per file: ``path -> (kind, reason)``, kinds `DANGLING`,
    `UNSUPPORTED`, `UNREADABLE`, `TOO_SHORT`. With ``strict`` (``data.on_bad_audio=error``) a bad
    file is an error naming it instead (too-short clips are always skipped: that is a filter)."""

    strict: bool = False
    skip_dir: str = ""
    """The run's output folder, to name its skip list in the warning (none: not named)."""
    looked_at: int = 0
    """Audio files (or rows) found, good and bad."""
    skipped: dict[str, tuple[str, str]] = field(default_factory=dict)

    def skip(self, path: str, kind: str, reason: str) -> None:
        if self.strict and kind != TOO_SHORT:
            raise DataError(f"{path}: {reason} (data.on_bad_audio=error; set it to skip to count and skip such files)")
        self.skipped.setdefault(path, (kind, reason))

    def pairs(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of every file left out: what the collator carries to `AudioSkips`."""
        return [(path, why) for path, (_, why) in self.skipped.items()]

    def of_kind(self, kind: str) -> list[tuple[str, str]]:
        return [(path, why) for path, (k, why) in self.skipped.items() if k == kind]

    def summary(self) -> str:
        """``6 skipped: 1 dangling, 2 unreadable, ...``, for errors."""
        kinds: dict[str, int] = {}
        for kind, _ in self.skipped.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        return f"{len(self.skipped)} skipped: " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))

    def warn(self, min_seconds: float) -> None:
        """One warning line per kind of skip, naming the first few files."""
        def named(items: list[tuple[str, str]], show: Any) -> str:
            shown = "; ".join(show(p, why) for p, why in items[:NAMED_IN_WARNINGS])
            return shown + (" ..." if len(items) > NAMED_IN_WARNINGS else "")

        lines = []
        dangling = self.of_kind(DANGLING)
        if dangling:
            lines.append(f"warning: skipping {len(dangling)} dangling symlink(s) to audio that is not there: "
                         + named(dangling, lambda p, why: f"{p} -> {why.removeprefix('dangling symlink to ')}"))
        unsupported = self.of_kind(UNSUPPORTED)
        if unsupported:
            formats = sorted({Path(p).suffix.lower() for p, _ in unsupported})
            shown = ", ".join(f"{ext} ({UNSUPPORTED_AUDIO.get(ext, 'unknown')})" for ext in formats)
            lines.append(f"warning: skipping {len(unsupported)} audio file(s) in a format libsndfile cannot decode "
                         f"({shown}): {named(unsupported, lambda p, why: p)}; convert them to FLAC or WAV "
                         f"(e.g. ffmpeg -i clip{formats[0]} clip.flac)")
        unreadable = self.of_kind(UNREADABLE)
        if unreadable:
            lines.append(f"warning: skipping {len(unreadable)} unreadable audio file(s) of {self.looked_at}: "
                         + named(unreadable, lambda p, why: f"{p} ({why})"))
        short = self.of_kind(TOO_SHORT)
        if short:
            lines.append(f"warning: skipping {len(short)} audio file(s) shorter than data.min_seconds={min_seconds}: "
                         + named(short, lambda p, why: f"{p} ({why.rsplit('(', 1)[-1].rstrip(')')})"))
        if lines and self.skip_dir:
            lines.append(f"audio data: {len(self.skipped)} file(s) left out, each listed with its reason in "
                         f"{Path(self.skip_dir) / 'data' / SKIP_LIST}")
        for line in lines:
            print(line, flush=True)


def _audio_kind(path: Path) -> str | None:
    """"audio" (libsndfile decodes it), `UNSUPPORTED` (audio it cannot decode), else None (not audio)."""
    suffix = path.suffix.lower()
    return "audio" if suffix in AUDIO_EXTENSIONS else UNSUPPORTED if suffix in UNSUPPORTED_AUDIO else None


def _unsupported_reason(path: Path) -> str:
    suffix = path.suffix.lower()
    return f"unsupported audio format {suffix} ({UNSUPPORTED_AUDIO[suffix]}): libsndfile cannot decode it; convert it to FLAC or WAV"


def list_audio_files(paths: Sequence[str], report: AudioReport, what: str = "data.files") -> list[Path]:
    """The decodable audio files named in ``paths`` or found (recursively, sorted) in named folders.

    Dangling symlinks and audio in formats libsndfile cannot decode are recorded in ``report`` (a
    counted skip, or an error when it is strict); other files in a folder are not audio and are
    ignored. A missing path, a named file that is not audio, or a folder without any audio file is a
    one-line error naming it.
    """
    out: list[Path] = []
    bad = 0
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = skipped = ignored = 0
            for f in sorted(p.rglob("*")):
                kind = _audio_kind(f)
                if kind is None or (f.is_dir() and not f.is_symlink()):
                    ignored += kind is None and f.is_file()
                    continue
                if f.is_symlink() and not f.exists():
                    report.skip(str(f.absolute()), DANGLING, f"dangling symlink to {os.readlink(f)}")
                    skipped += 1
                elif not f.is_file():
                    continue
                elif kind == UNSUPPORTED:
                    report.skip(str(f.resolve()), UNSUPPORTED, _unsupported_reason(f))
                    skipped += 1
                else:
                    out.append(f.resolve())
                    found += 1
            bad += skipped
            if not found and not skipped:
                other = f" (only {ignored} other file(s), which are not audio)" if ignored else ""
                raise DataError(f"{what}: folder {p} holds no audio files ({' '.join(AUDIO_EXTENSIONS)}){other}")
        elif p.is_file():
            kind = _audio_kind(p)
            if kind is None:
                raise DataError(f"{what}: {p}: unsupported file type {p.suffix!r}; use one of {' '.join(AUDIO_EXTENSIONS)}")
            if kind == UNSUPPORTED:
                report.skip(str(p.resolve()), UNSUPPORTED, _unsupported_reason(p))
                bad += 1
            else:
                out.append(p.resolve())
        elif p.is_symlink():
            raise DataError(f"{what}: no such file or folder: {p} (a dangling symlink to {os.readlink(p)})")
        else:
            raise DataError(f"{what}: no such file or folder: {p}")
    report.looked_at += len(out) + bad
    return out


def _probe(source: str | bytes, name: str = "") -> float:
    """Duration in seconds from the header alone; raises `UndecodableAudio`."""
    import soundfile as sf

    name = name or (str(source) if not isinstance(source, bytes) else "<audio bytes>")
    try:
        info = sf.info(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Exception as err:
        raise UndecodableAudio(name, f"cannot read the audio header ({_libsndfile_reason(err)})") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise UndecodableAudio(name, "holds no audio samples")
    return info.frames / info.samplerate


def too_short_reason(seconds: float, min_seconds: float) -> str:
    return f"shorter than data.min_seconds={min_seconds} ({seconds:.2f} s)"


def load_utterances(cfg: AudioDataConfig, report: AudioReport | None = None) -> tuple[Any, str]:
    """A `datasets.Dataset` with ``path``, ``duration`` (and transcript/speaker/label when given) and
    a description of the source. Files that cannot be used (see `list_audio_files`; a header that
    cannot be read) and clips under ``data.min_seconds`` are left out, recorded in ``report`` and
    warned about, one line per kind (or, for bad files with ``data.on_bad_audio=error``, an error)."""
    import datasets

    report = report if report is not None else AudioReport()
    report.strict = cfg.on_bad_audio == "error"
    if cfg.files:
        paths = [str(f) for f in list_audio_files(cfg.files, report)]
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
    if not cfg.files:
        report.looked_at += len(cols["path"])
    blobs = cols.get("bytes")
    long_enough: list[tuple[int, float]] = []
    for i, path in enumerate(cols["path"]):
        try:
            seconds = _probe(blobs[i] if blobs and blobs[i] is not None else path, path)
        except UndecodableAudio as err:
            report.skip(path, UNREADABLE, err.reason)
            continue
        if seconds >= cfg.min_seconds:
            long_enough.append((i, seconds))
        else:
            report.skip(path, TOO_SHORT, too_short_reason(seconds, cfg.min_seconds))
    report.warn(cfg.min_seconds)
    if not long_enough:
        short = bool(report.of_kind(TOO_SHORT))
        why = f"no readable audio file of at least data.min_seconds={cfg.min_seconds}" if short else "no readable audio file"
        raise DataError(f"{source}: {why} (of {report.looked_at}; {report.summary()})")
    rows = [i for i, _ in long_enough]
    out = {name: [values[i] for i in rows] for name, values in cols.items()}
    out["duration"] = [d for _, d in long_enough]
    return datasets.Dataset.from_dict(out), source
