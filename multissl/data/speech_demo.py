"""Embedded speech demo corpus: CPython help-topic sentences read aloud by eSpeak NG, offline.

The wav2vec 2.0 pretraining and CTC fine-tuning recipes need labelled speech that every machine can
make without a download, so this module synthesises it. Sentences come from
`multissl.data.demo.python_doc_paragraphs` (the same text as the text demo); voices come from the
``libespeak-ng`` shared library shipped by the ``espeakng-loader`` wheel, driven through ``ctypes``.

Determinism is the point of the design, because tests compare WAV bytes and a later holdout split is
keyed by ``speaker``:

* libespeak-ng keeps state between utterances (pitch phase, echo buffer, voice tables), so every
  utterance is spoken by a *fresh copy* of the library: the ``.so`` is copied to a new temporary
  file, loaded with ``ctypes.CDLL`` (the loader keys libraries by path and inode, so a copy never
  aliases another load), used once, terminated and closed.
* ``espeak_ng_Initialize`` seeds the noise generator of breathy variants (``f2``, ``f3``, ``f5``)
  from the clock; we reseed it right after initialisation (``espeak_ng_SetRandSeed``) and also seed
  libc's ``rand`` (used by the Klatt-style generator) from the utterance's own seed.
* Per-utterance choices (speaker, rate, pitch, noise seed) come from ``random.Random`` seeded by
  ``"{seed}:{index}"``, and sentences from one seeded shuffle, so a corpus of ``n`` utterances is a
  prefix of the corpus of ``m > n`` utterances with the same seed.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import wave
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

CORPUS_VERSION = 1
#: Every character a transcript may contain; CTC vocabularies can be built from this alone.
TRANSCRIPT_ALPHABET = " 'abcdefghijklmnopqrstuvwxyz"
#: English base voices of espeak-ng (file names under ``espeak-ng-data/lang/gmw``, lowercased).
BASE_VOICES = (
    "en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
)
#: Human-sounding variants (``espeak-ng-data/voices/!v``); the robotic and Klatt ones are left out.
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5")
#: Speaker ids: ``"<base voice>+<variant>"``, the unit a later split holds out.
SPEAKERS = tuple(f"{base}+{variant}" for base in BASE_VOICES for variant in VARIANTS)
RATE_RANGE = (130, 200)  # words per minute
PITCH_RANGE = (30, 70)  # espeak's 0-100 scale, 50 = the variant's own pitch
VOLUME = 80  # espeak's default (100) peaks at the int16 limit on some voices; 80 leaves headroom
MIN_WORDS, MAX_WORDS = 4, 20
MAX_EDGE_SILENCE_S = 0.1

_ESPEAK_RATE = 22050
_SILENCE_THRESHOLD = 0.004  # |sample| below this (about -48 dBFS) counts as silence when trimming
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _VOLUME, _PITCH = 1, 2, 3
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

# ---------------------------------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------------------------------

_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*")


def _number_words(n: int) -> str:
    """English words for 0-999 (larger numbers and decimals make the sentence rejected instead)."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + _number_words(rest))


def _spoken_form(sentence: str) -> str | None:
    """The sentence as espeak should read it, or None when it is not plain prose.

    Words are rewritten so that the speech and the transcript say the same thing: numbers are
    spelled, hyphens become spaces, brackets and quotes go. Acronyms, CamelCase, code, abbreviations
    ("e.g.") and decimals are rejected, because espeak spells or reads them in ways a character
    transcript cannot follow.
    """
    words: list[str] = []
    for token in sentence.split():
        core = token.lstrip("(\"'")
        trail = ""
        while core and core[-1] in ",.;:!?)\"'":
            trail = core[-1] + trail
            core = core[:-1]
        if core.isdigit() and len(core) <= 3:
            words.extend(_number_words(int(core)).split())
        elif _WORD.fullmatch(core) and (core[1:].islower() or len(core) == 1):
            words.extend(core.replace("-", " ").split())
        else:
            return None
        if not any(v in words[-1].lower() for v in "aeiouy"):
            return None  # "str", "len", "xyz": espeak spells them letter by letter
        mark = next((c for c in trail if c in ",.;:!?"), "")
        if mark:
            words[-1] += "," if mark in ",;:" else "."
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    text = " ".join(words).rstrip(",")
    return text if text.endswith(".") else text + "."


def _transcript(spoken: str) -> str:
    """Lowercase words separated by single spaces; only `TRANSCRIPT_ALPHABET` remains."""
    return " ".join(re.sub(r"[^a-z' ]", " ", spoken.lower()).split())


def demo_sentences() -> list[dict[str, str]]:
    """Plain-prose sentences of the CPython help topics as ``{"text", "transcript"}``, fixed order.

    ``text`` is what espeak reads (punctuation kept for prosody), ``transcript`` its normalised form.
    Duplicates (by transcript) are dropped so a shuffle never repeats a sentence.
    """
    from multissl.data.demo import python_doc_paragraphs

    rows, seen = [], set()
    for para in python_doc_paragraphs():
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", para["text"]):
            spoken = _spoken_form(sentence) if sentence[-1:] in ".!?" else None
            if spoken is None:
                continue
            transcript = _transcript(spoken)
            if transcript not in seen:
                seen.add(transcript)
                rows.append({"text": spoken, "transcript": transcript})
    return rows


# ---------------------------------------------------------------------------------------------------
# Synthesis
# ---------------------------------------------------------------------------------------------------


def _espeak_paths() -> tuple[str, str]:
    """``(library, data folder)`` of the espeakng-loader wheel; a clear error when it is missing."""
    try:
        import espeakng_loader
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise RuntimeError("the speech demo needs `pip install espeakng-loader`") from e
    return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


def _espeak_version() -> str:
    """Version of the wheel that provides the voices: a different one may sound different."""
    from importlib.metadata import version

    return version("espeakng-loader")


@contextlib.contextmanager
def _fresh_espeak(lib_path: str, workdir: str, tag: str) -> Iterator[ctypes.CDLL]:
    """A private, never-used instance of libespeak-ng (see the module docstring for why)."""
    copy = os.path.join(workdir, f"libespeak-ng-{tag}.so")
    shutil.copyfile(lib_path, copy)
    lib = ctypes.CDLL(copy)
    try:
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = None
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]
        yield lib
    finally:
        with contextlib.suppress(AttributeError):
            lib.espeak_Terminate()
        import _ctypes

        if hasattr(_ctypes, "dlclose"):
            _ctypes.dlclose(lib._handle)
        os.unlink(copy)


def _synthesize(text: str, speaker: str, rate: int, pitch: int, noise_seed: int, workdir: str) -> np.ndarray:
    """int16 samples at 22050 Hz of ``text`` spoken by ``speaker``, from a fresh library state."""
    lib_path, data_path = _espeak_paths()
    chunks: list[np.ndarray] = []

    def collect(wav, num_samples, _events):  # called by espeak for each chunk of samples
        if num_samples > 0 and wav:
            chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0

    callback = _SynthCallback(collect)  # kept alive by this frame until synthesis is over
    with _fresh_espeak(lib_path, workdir, f"{os.getpid()}-{noise_seed}") as lib:
        rate_hz = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_DONT_EXIT)
        if rate_hz != _ESPEAK_RATE:
            raise RuntimeError(f"espeak_Initialize failed or changed rate: {rate_hz}")
        lib.espeak_ng_SetRandSeed(noise_seed)  # replaces the clock seed of espeak_ng_Initialize
        libc = ctypes.CDLL(None)
        libc.srand.argtypes = [ctypes.c_uint]
        libc.srand(noise_seed)
        lib.espeak_SetSynthCallback(callback)
        if lib.espeak_SetVoiceByName(speaker.encode()) != 0:
            raise RuntimeError(f"espeak has no voice {speaker!r}")
        for param, value in ((_RATE, rate), (_PITCH, pitch), (_VOLUME, VOLUME)):
            lib.espeak_SetParameter(param, value, 0)
        encoded = text.encode("utf-8")
        err = lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != 0 or lib.espeak_Synchronize() != 0:
            raise RuntimeError(f"espeak_Synth failed ({err}) on {text!r}")
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)


@functools.lru_cache(maxsize=4)
def _resample_kernel(orig: int, new: int) -> tuple[np.ndarray, np.ndarray]:
    """Polyphase Hann-windowed sinc filter for ``orig -> new`` samples: ``(first tap, weights)`` per phase.

    Output sample ``b * new + p`` sits at input time ``t = b * orig + p * orig / new``; its taps are
    the ``2 * half`` input samples around ``t``, starting at ``b * orig + first[p]``, weighted by
    ``weights[p]``. Computed once per rate pair.
    """
    cutoff = 0.97 * min(orig, new) / orig  # of the input Nyquist; just below the output's
    half = int(np.ceil(8 / cutoff))  # 8 zero crossings each side
    t = np.arange(new) * orig / new
    first = np.floor(t).astype(np.int64) - half + 1
    d = t[:, None] - (first[:, None] + np.arange(2 * half))
    window = np.cos(np.pi * np.clip(d / (2 * half), -0.5, 0.5)) ** 2
    return first, cutoff * np.sinc(cutoff * d) * window


def _resample(x: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Band-limited resampling in numpy: no torch import, no thread pool fighting for 2 cores, and a
    fixed summation order (einsum, not BLAS), so the result depends on the input alone."""
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    first, weights = _resample_kernel(orig, new)
    taps = weights.shape[1]
    n_out = -(-len(x) * new // orig)
    j = np.arange(n_out)
    start = (j // new) * orig + first[j % new] + taps  # + taps: offset of x inside the padding
    padded = np.concatenate([np.zeros(taps), x, np.zeros(2 * taps)])
    return np.einsum("ij,ij->i", padded[start[:, None] + np.arange(taps)], weights[j % new])


def _to_pcm16(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Resample espeak's 22050 Hz output and trim edge silence to `MAX_EDGE_SILENCE_S`."""
    x = samples.astype(np.float64) / 32768.0
    if sample_rate != _ESPEAK_RATE:
        x = _resample(x, _ESPEAK_RATE, sample_rate)
    loud = np.flatnonzero(np.abs(x) > _SILENCE_THRESHOLD)
    if len(loud):
        pad = int(MAX_EDGE_SILENCE_S * sample_rate)
        x = x[max(0, loud[0] - pad): loud[-1] + 1 + pad]
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


# ---------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------


def _check_voices() -> None:
    """Fail loudly rather than let espeak fall back silently to the base voice (it does, for variants)."""
    data = Path(_espeak_paths()[1])
    variants = {p.name for p in (data / "voices" / "!v").iterdir()}
    langs = {p.name.lower() for p in (data / "lang").rglob("*") if p.is_file()}
    missing = [v for v in VARIANTS if v not in variants] + [b for b in BASE_VOICES if b not in langs]
    if missing:
        raise RuntimeError(f"espeak-ng data lacks voices {missing}; is espeakng-loader too old or too new?")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write through a private temp file so readers (and concurrent builders) never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _wav_bytes(pcm: np.ndarray, sample_rate: int) -> bytes:
    """16-bit mono PCM WAV, written by the stdlib so the bytes depend on the samples alone."""
    import io

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.astype("<i2").tobytes())
    return buf.getvalue()


def _params(num_utterances: int, seed: int, sample_rate: int) -> dict[str, object]:
    return {
        "version": CORPUS_VERSION, "num_utterances": num_utterances, "seed": seed,
        "sample_rate": sample_rate, "espeakng_loader": _espeak_version(),
    }


def _is_built(out: Path, params: dict[str, object]) -> bool:
    """True when corpus.json records these parameters and the manifest (and its WAVs) it vouches for."""
    try:
        stored = json.loads((out / "corpus.json").read_text())
        manifest = (out / "manifest.jsonl").read_bytes()
    except (OSError, ValueError):
        return False
    if stored.get("params") != params or stored.get("manifest_sha256") != hashlib.sha256(manifest).hexdigest():
        return False
    rows = [json.loads(line) for line in manifest.decode().splitlines()]
    return all((out / r["path"]).is_file() for r in rows)


def build_speech_corpus(
    out_dir: str | Path, num_utterances: int = 400, seed: int = 0, sample_rate: int = 16000
) -> Path:
    """Write out_dir/wavs/*.wav (16-bit PCM mono, 16 kHz) and out_dir/manifest.jsonl; return the manifest path.

    Manifest rows are ``{"path", "duration", "transcript", "speaker", "rate", "pitch"}`` with ``path``
    relative to the manifest. The same arguments give byte-identical files on any run (same
    espeakng-loader version), and a second call finds them already built (``corpus.json``) and
    returns at once. Sentences are drawn without repetition until the pool runs out (about 700), then
    reshuffled, so very large corpora repeat sentences with other voices.
    """
    if num_utterances < 1:
        raise ValueError(f"num_utterances must be positive, got {num_utterances}")
    out = Path(out_dir)
    manifest_path = out / "manifest.jsonl"
    params = _params(num_utterances, seed, sample_rate)
    if _is_built(out, params):
        return manifest_path

    _check_voices()
    sentences = demo_sentences()
    order: list[int] = []
    for epoch in range((num_utterances + len(sentences) - 1) // len(sentences)):
        perm = list(range(len(sentences)))
        random.Random(f"speech-demo-sentences:{seed}:{epoch}").shuffle(perm)
        order += perm

    wav_dir = out / "wavs"
    wav_dir.mkdir(parents=True, exist_ok=True)
    (out / "corpus.json").unlink(missing_ok=True)  # the old corpus is no longer vouched for
    rows = []
    with tempfile.TemporaryDirectory(prefix="multissl-espeak-") as workdir:
        for i in range(num_utterances):
            rng = random.Random(f"speech-demo-utterance:{seed}:{i}")
            speaker = rng.choice(SPEAKERS)
            rate, pitch = rng.randint(*RATE_RANGE), rng.randint(*PITCH_RANGE)
            noise_seed = zlib.crc32(f"{seed}:{i}".encode())
            sentence = sentences[order[i]]
            raw = _synthesize(sentence["text"], speaker, rate, pitch, noise_seed, workdir)
            pcm = _to_pcm16(raw, sample_rate)
            rel = f"wavs/{i + 1:06d}.wav"
            _atomic_write(out / rel, _wav_bytes(pcm, sample_rate))
            rows.append({
                "path": rel, "duration": round(len(pcm) / sample_rate, 6), "transcript": sentence["transcript"],
                "speaker": speaker, "rate": rate, "pitch": pitch,
            })

    return finish_wav_corpus(out, rows, params)


def finish_wav_corpus(out: Path, rows: list[dict[str, object]], params: dict[str, object]) -> Path:
    """Remove WAVs an earlier build left (other sizes, speakers or repeats), then write the manifest
    and ``corpus.json``, which vouches for it (parameters + the manifest's hash); last, so an
    interrupted build is never taken for a finished one."""
    keep = {Path(str(r["path"])).name for r in rows}
    for stale in (out / "wavs").glob("*.wav"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    manifest = "".join(json.dumps(r) + "\n" for r in rows).encode()
    _atomic_write(out / "manifest.jsonl", manifest)
    record = {"params": params, "manifest_sha256": hashlib.sha256(manifest).hexdigest()}
    _atomic_write(out / "corpus.json", (json.dumps(record, indent=2) + "\n").encode())
    return out / "manifest.jsonl"


def default_speech_corpus() -> Path:
    """Build (once) the default 400-utterance corpus in the cache and return its manifest path.

    The cache folder is ``$MULTISSL_CACHE/speech-demo-v1``, or ``~/.cache/multissl/speech-demo-v1``.
    """
    from multissl.data.files import cache_root

    return build_speech_corpus(cache_root() / f"speech-demo-v{CORPUS_VERSION}")
