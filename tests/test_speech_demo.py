"""The embedded speech corpus: valid WAVs, clean transcripts, byte-identical rebuilds, cheap reuse."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("espeakng_loader")

from multissl.data import speech_demo as sd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N = 12


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sd.build_speech_corpus(tmp_path_factory.mktemp("speech") / "corpus", num_utterances=N, seed=0)


def test_manifest_rows_describe_valid_wavs(corpus: Path) -> None:
    rows = _rows(corpus)
    assert len(rows) == N
    assert {"path", "duration", "transcript", "speaker", "rate", "pitch"} == set(rows[0])
    for row in rows:
        wav = corpus.parent / row["path"]
        info = sf.info(wav)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        audio, sr = sf.read(wav, dtype="int16")
        assert audio.ndim == 1 and audio.dtype == np.int16
        assert abs(len(audio) / sr - row["duration"]) < 1e-5
        assert 0.5 < row["duration"] < 15
        assert np.abs(audio).max() > 3000, "speech, not silence"
        edge = int(0.15 * sr)  # trimmed to ~0.1 s of silence at each end
        assert np.abs(audio[:edge]).max() > 300 and np.abs(audio[-edge:]).max() > 300
        assert row["transcript"] and set(row["transcript"]) <= set(sd.TRANSCRIPT_ALPHABET)
        assert row["transcript"] == " ".join(row["transcript"].split())
        assert row["speaker"] in sd.SPEAKERS
        assert sd.RATE_RANGE[0] <= row["rate"] <= sd.RATE_RANGE[1]
        assert sd.PITCH_RANGE[0] <= row["pitch"] <= sd.PITCH_RANGE[1]
    assert len({r["speaker"] for r in rows}) >= 6
    assert len({r["transcript"] for r in rows}) == N


def test_rebuild_in_fresh_process_is_byte_identical(corpus: Path, tmp_path: Path) -> None:
    code = (
        "import sys; from multissl.data.speech_demo import build_speech_corpus; "
        f"build_speech_corpus(sys.argv[1], num_utterances={N}, seed=0)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "again")], check=True, env=env, timeout=120)
    first, second = _files(corpus.parent), _files(tmp_path / "again")
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first), [k for k in first if first[k] != second[k]]


def test_second_call_is_a_noop(corpus: Path) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in corpus.parent.rglob("*") if p.is_file()}
    assert sd.build_speech_corpus(corpus.parent, num_utterances=N, seed=0) == corpus
    assert {p: p.stat().st_mtime_ns for p in corpus.parent.rglob("*") if p.is_file()} == stamps


def test_other_parameters_rebuild_and_drop_stale_wavs(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    out.mkdir()
    for name, data in _files(corpus.parent).items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    manifest = sd.build_speech_corpus(out, num_utterances=4, seed=0)
    rows = _rows(manifest)
    assert rows == _rows(corpus)[:4], "a smaller corpus is a prefix of a larger one (same seed)"
    assert sorted(p.name for p in (out / "wavs").iterdir()) == [Path(r["path"]).name for r in rows]
    assert json.loads((out / "corpus.json").read_text())["params"]["num_utterances"] == 4


def test_every_speaker_is_a_distinct_voice(tmp_path: Path) -> None:
    """espeak silently falls back to the base voice for an unknown variant: catch that here."""
    digests = {
        hashlib.sha256(sd._synthesize("Hello there.", s, 160, 50, 1, str(tmp_path)).tobytes()).hexdigest()
        for s in sd.SPEAKERS
    }
    assert len(digests) == len(sd.SPEAKERS)


def test_sentence_normalisation() -> None:
    assert sd._spoken_form("Return 3 values (see the table), in order.") == "Return three values see the table, in order."
    assert sd._spoken_form("It has 115 built-in names.") == "It has one hundred and fifteen built in names."
    for code_like in ("Use e.g. this one here.", "The ABC class is here.", "Call foo_bar now please.",
                      "See PEP 8 for details.", "New in version 3.10.", "Use str for the text."):
        assert sd._spoken_form(code_like) is None, code_like
    sentences = sd.demo_sentences()
    assert len(sentences) > 500
    for s in sentences:
        assert set(s["transcript"]) <= set(sd.TRANSCRIPT_ALPHABET)
        assert sd.MIN_WORDS <= len(s["transcript"].split()) <= sd.MAX_WORDS


def test_default_corpus_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = []
    monkeypatch.setattr(sd, "build_speech_corpus", lambda out: seen.append(Path(out)) or Path(out) / "m")
    monkeypatch.setenv("MULTISSL_CACHE", str(tmp_path))
    sd.default_speech_corpus()
    monkeypatch.delenv("MULTISSL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    sd.default_speech_corpus()
    assert seen == [tmp_path / "speech-demo-v1", tmp_path / "home" / ".cache" / "multissl" / "speech-demo-v1"]
