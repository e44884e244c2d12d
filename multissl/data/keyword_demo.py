"""Embedded keyword-spotting corpus: Speech Commands' ten command words spoken by eSpeak NG, offline.

The audio-classification recipe (``Wav2Vec2ForSequenceClassification``) and frozen-feature probes
need labelled short clips that every machine can make without a download. This module speaks each
of `KEYWORDS` with every speaker of `multissl.data.speech_demo.SPEAKERS`, ``repeats`` times, and
writes one-second clips like Google Speech Commands.

It reuses the speech demo's engine and keeps its guarantees (see that module's docstring): every
utterance comes from a fresh copy of libespeak-ng with its noise generators seeded, WAVs are written
by the stdlib, so the same arguments give byte-identical files, and ``corpus.json`` vouches for a
finished build. What differs:

* Per-utterance choices (rate, pitch, noise seed, where the word sits in the clip) come from
  ``random.Random("keyword-demo:{seed}:{speaker}:{word}:{r}")``, so an utterance depends on its own
  key alone: a corpus built for a subset of speakers holds exactly those speakers' clips of the full
  corpus, and the corpus is balanced over words and speakers by construction.
* Each word is trimmed like the speech demo's sentences, faded in and out over `FADE_S` (espeak
  starts and stops some voices mid-waveform, which would click against the padding), and placed at a
  seeded random offset inside a `CLIP_SECONDS` clip padded with zeros. Zeros rather than a little
  noise: espeak's own output has no noise floor (its pauses are digital zeros), so zero padding
  sounds like the voice's own silence, needs no second random stream, and keeps "where is the word"
  exactly recoverable; noise augmentation belongs to the training pipeline, not the corpus.
  A word longer than the clip (very slow speech) is kept whole: the clip then is the word.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from multissl.data.speech_demo import (
    PITCH_RANGE,
    RATE_RANGE,
    SPEAKERS,
    _atomic_write,
    _check_voices,
    _espeak_version,
    _is_built,
    _synthesize,
    _to_pcm16,
    _wav_bytes,
    finish_wav_corpus,
)

CORPUS_VERSION = 1
#: The ten command words of Google Speech Commands (v0.01/v0.02's core classes), in its order.
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
CLIP_SECONDS = 1.0
FADE_S = 0.005  # raised-cosine ramp at each end of the word
MIN_PEAK = 0.05  # a word whose |peak| stays below this share of full scale counts as silent


def _choices(seed: int, speaker: str, word: str, r: int) -> dict[str, Any]:
    """Rate, pitch, noise seed and clip position (a fraction in [0, 1)) of one utterance."""
    rng = random.Random(f"keyword-demo:{seed}:{speaker}:{word}:{r}")
    return {
        "rate": rng.randint(*RATE_RANGE), "pitch": rng.randint(*PITCH_RANGE),
        "noise_seed": rng.getrandbits(31), "position": rng.random(),
    }


def _speak_word(word: str, speaker: str, rate: int, pitch: int, noise_seed: int, sample_rate: int,
                workdir: str) -> np.ndarray:
    """The word as int16 at ``sample_rate``: trimmed like the speech demo, faded at both ends."""
    pcm = _to_pcm16(_synthesize(word, speaker, rate, pitch, noise_seed, workdir), sample_rate)
    peak = int(np.abs(pcm.astype(np.int32)).max()) if len(pcm) else 0
    if peak < MIN_PEAK * 32768:
        raise RuntimeError(f"espeak said {word!r} silently with {speaker} (rate {rate}, pitch {pitch}): peak {peak}")
    n = min(int(FADE_S * sample_rate), len(pcm) // 2)
    if n == 0:
        return pcm
    ramp = np.sin(0.5 * np.pi * (np.arange(n) + 0.5) / n) ** 2
    x = pcm.astype(np.float64)
    x[:n] *= ramp
    x[len(x) - n:] *= ramp[::-1]
    return np.round(x).astype(np.int16)


def _place(word: np.ndarray, position: float, sample_rate: int) -> tuple[np.ndarray, int]:
    """``(clip, start)``: the word at ``start`` samples inside a zero clip of max(`CLIP_SECONDS`, word)."""
    length = max(int(round(CLIP_SECONDS * sample_rate)), len(word))
    start = int(position * (length - len(word) + 1))
    clip = np.zeros(length, dtype=np.int16)
    clip[start:start + len(word)] = word
    return clip, start


def _wav_name(word: str, speaker: str, r: int) -> str:
    return f"wavs/{word}_{speaker.replace('+', '-')}_{r}.wav"


def _params(repeats: int, seed: int, sample_rate: int, speakers: Sequence[str]) -> dict[str, object]:
    return {
        "version": CORPUS_VERSION, "repeats": repeats, "seed": seed, "sample_rate": sample_rate,
        "keywords": list(KEYWORDS), "speakers": list(speakers), "espeakng_loader": _espeak_version(),
    }


def _check_args(repeats: int, sample_rate: int, speakers: Sequence[str]) -> None:
    if repeats < 1:
        raise ValueError(f"repeats must be positive, got {repeats}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if not speakers:
        raise ValueError("speakers must name at least one speaker")
    unknown = [s for s in speakers if s not in SPEAKERS]
    if unknown:
        raise ValueError(f"unknown speakers {unknown}; choose from multissl.data.speech_demo.SPEAKERS")
    if len(set(speakers)) != len(speakers):
        raise ValueError("speakers must not repeat")


def build_keyword_corpus(
    out_dir: str | Path, repeats: int = 1, seed: int = 0, sample_rate: int = 16000,
    speakers: Sequence[str] | None = None,
) -> Path:
    """Write out_dir/wavs/*.wav (16-bit PCM mono) and out_dir/manifest.jsonl; return the manifest path.

    Every ``(speaker, keyword)`` pair is spoken ``repeats`` times, ``speakers`` defaulting to all of
    `SPEAKERS` (pass a subset for a small corpus; its clips are the full corpus's clips for those
    speakers). Manifest rows are ``{"path", "duration", "label", "speaker", "rate", "pitch"}`` with
    ``path`` relative to the manifest and ``label`` the word; rows come speaker by speaker, word by
    word. Every clip lasts `CLIP_SECONDS` (longer only if the word does). The same arguments give
    byte-identical files (same espeakng-loader version), and a second call finds them already built
    (``corpus.json``) and returns at once; a damaged corpus (a file missing) is rebuilt.
    """
    speakers = list(SPEAKERS if speakers is None else speakers)
    _check_args(repeats, sample_rate, speakers)
    out = Path(out_dir)
    manifest_path = out / "manifest.jsonl"
    params = _params(repeats, seed, sample_rate, speakers)
    if _is_built(out, params):
        return manifest_path

    _check_voices()
    wav_dir = out / "wavs"
    wav_dir.mkdir(parents=True, exist_ok=True)
    (out / "corpus.json").unlink(missing_ok=True)  # the old corpus is no longer vouched for
    rows = []
    with tempfile.TemporaryDirectory(prefix="multissl-espeak-") as workdir:
        for speaker in speakers:
            for word in KEYWORDS:
                for r in range(repeats):
                    c = _choices(seed, speaker, word, r)
                    spoken = _speak_word(word, speaker, c["rate"], c["pitch"], c["noise_seed"], sample_rate, workdir)
                    clip, _ = _place(spoken, c["position"], sample_rate)
                    rel = _wav_name(word, speaker, r)
                    _atomic_write(out / rel, _wav_bytes(clip, sample_rate))
                    rows.append({
                        "path": rel, "duration": round(len(clip) / sample_rate, 6), "label": word,
                        "speaker": speaker, "rate": c["rate"], "pitch": c["pitch"],
                    })

    return finish_wav_corpus(out, rows, params)


def default_keyword_corpus() -> Path:
    """Build (once) the default corpus (all speakers x `KEYWORDS`, once each) and return its manifest path.

    The folder is ``$MULTISSL_CACHE/keyword-demo-v1`` or ``~/.cache/multissl/keyword-demo-v1``; it is
    built in a temporary sibling and renamed into place, so readers never see half a corpus.
    """
    from multissl.data.files import build_once, cache_root

    final = cache_root() / f"keyword-demo-v{CORPUS_VERSION}"
    params = _params(1, 0, 16000, SPEAKERS)
    build_once(final, lambda folder: _is_built(folder, params), build_keyword_corpus)
    return final / "manifest.jsonl"
