"""The embedded keyword corpus: balanced 1 s clips, byte-identical rebuilds, cheap reuse, loadable audio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("espeakng_loader")

from multissl.data import keyword_demo as kd  # noqa: E402
from multissl.data.speech_demo import PITCH_RANGE, RATE_RANGE, SPEAKERS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEAKERS_SMALL = ("en+m1", "en-us+f2", "en-gb-scotland+f5", "en-029+m4")  # a breathy f-voice included
REPEATS = 2


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(src: Path, dst: Path) -> None:
    for name, data in _files(src).items():
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_bytes(data)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keywords") / "corpus"
    return kd.build_keyword_corpus(out, repeats=REPEATS, seed=0, speakers=SPEAKERS_SMALL)


def test_balanced_one_second_clips_holding_the_whole_word(corpus: Path, tmp_path: Path) -> None:
    rows = _rows(corpus)
    assert len(rows) == len(SPEAKERS_SMALL) * len(kd.KEYWORDS) * REPEATS
    assert set(rows[0]) == {"path", "duration", "label", "speaker", "rate", "pitch"}
    assert Counter(r["label"] for r in rows) == {w: len(SPEAKERS_SMALL) * REPEATS for w in kd.KEYWORDS}
    assert Counter((r["speaker"], r["label"]) for r in rows) == {
        (s, w): REPEATS for s in SPEAKERS_SMALL for w in kd.KEYWORDS
    }
    assert len({r["path"] for r in rows}) == len(rows)
    for row in rows:
        wav = corpus.parent / row["path"]
        info = sf.info(wav)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        audio, sr = sf.read(wav, dtype="int16")
        assert audio.ndim == 1 and len(audio) / sr >= kd.CLIP_SECONDS
        assert abs(len(audio) / sr - row["duration"]) < 1e-5
        assert np.abs(audio.astype(np.int32)).max() > 3000, "speech, not silence"
        assert RATE_RANGE[0] <= row["rate"] <= RATE_RANGE[1] and PITCH_RANGE[0] <= row["pitch"] <= PITCH_RANGE[1]
    # The word lies whole inside its clip: re-speak a few and find them, zeros all around.
    for row in rows[:: len(rows) // 6]:
        r = int(Path(row["path"]).stem.rsplit("_", 1)[1])
        c = kd._choices(0, row["speaker"], row["label"], r)
        assert (c["rate"], c["pitch"]) == (row["rate"], row["pitch"])
        word = kd._speak_word(row["label"], row["speaker"], c["rate"], c["pitch"], c["noise_seed"], 16000, str(tmp_path))
        audio, _ = sf.read(corpus.parent / row["path"], dtype="int16")
        start = int(np.flatnonzero(audio)[0] - np.flatnonzero(word)[0])  # the fade may round to zeros
        assert np.array_equal(audio[start:start + len(word)], word)
        assert not audio[:start].any() and not audio[start + len(word):].any()
        assert len(word) < len(audio), "room left to place the word"


def test_word_positions_vary_and_long_words_are_kept_whole() -> None:
    word = np.full(4000, 1000, dtype=np.int16)
    starts = {kd._place(word, kd._choices(0, "en+m1", "yes", r)["position"], 16000)[1] for r in range(20)}
    assert len(starts) > 15 and min(starts) >= 0 and max(starts) <= 16000 - 4000
    assert kd._place(word, 0.0, 16000)[1] == 0 and kd._place(word, 0.999999, 16000)[1] == 16000 - 4000
    long = np.full(20000, 1000, dtype=np.int16)
    clip, start = kd._place(long, 0.7, 16000)
    assert start == 0 and np.array_equal(clip, long)


def test_rebuild_in_fresh_process_is_byte_identical_and_seed_matters(corpus: Path, tmp_path: Path) -> None:
    code = (
        "import sys; from multissl.data.keyword_demo import build_keyword_corpus; "
        f"build_keyword_corpus(sys.argv[1], repeats={REPEATS}, seed=0, speakers={SPEAKERS_SMALL!r})"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "again")], check=True, env=env, timeout=120)
    first, second = _files(corpus.parent), _files(tmp_path / "again")
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first), [k for k in first if first[k] != second[k]]

    other = kd.build_keyword_corpus(tmp_path / "seed1", repeats=REPEATS, seed=1, speakers=SPEAKERS_SMALL)
    third = _files(other.parent)
    assert first.keys() == third.keys()
    assert first["manifest.jsonl"] != third["manifest.jsonl"]
    wavs = [k for k in first if k.startswith("wavs/")]
    assert sum(first[k] != third[k] for k in wavs) > 0.9 * len(wavs)


def test_subset_of_speakers_is_part_of_the_larger_corpus(corpus: Path, tmp_path: Path) -> None:
    sub = kd.build_keyword_corpus(tmp_path / "sub", repeats=1, seed=0, speakers=SPEAKERS_SMALL[1:2])
    big = {r["path"]: r for r in _rows(corpus)}
    for row in _rows(sub):
        assert big[row["path"]] == row
        assert (sub.parent / row["path"]).read_bytes() == (corpus.parent / row["path"]).read_bytes()


def test_second_call_is_a_noop_and_damage_is_repaired(corpus: Path, tmp_path: Path) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in corpus.parent.rglob("*") if p.is_file()}
    assert kd.build_keyword_corpus(corpus.parent, repeats=REPEATS, seed=0, speakers=SPEAKERS_SMALL) == corpus
    assert {p: p.stat().st_mtime_ns for p in corpus.parent.rglob("*") if p.is_file()} == stamps

    out = tmp_path / "damaged"
    _copy(corpus.parent, out)
    victim = out / _rows(corpus)[3]["path"]
    victim.unlink()
    (out / "wavs" / "stale.wav").write_bytes(b"left by an older build")
    manifest = kd.build_keyword_corpus(out, repeats=REPEATS, seed=0, speakers=SPEAKERS_SMALL)
    assert victim.is_file()
    assert _files(out) == _files(corpus.parent), "rebuilt byte for byte, stale files gone"
    assert manifest == out / "manifest.jsonl"


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    for kwargs in ({"repeats": 0}, {"speakers": []}, {"speakers": ["en+robot"]}, {"speakers": ["en+m1", "en+m1"]},
                   {"sample_rate": 0}):
        with pytest.raises(ValueError):
            kd.build_keyword_corpus(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_prepare_audio_keeps_labels_and_holds_out_whole_speakers(corpus: Path) -> None:
    import torch

    from multissl.data.audio import AudioDataConfig
    from multissl.data.audio_splits import prepare_audio

    cfg = AudioDataConfig(manifest=str(corpus), min_seconds=0.5, max_seconds=2.0, max_batch_samples=64000,
                          validation_fraction=0.25)
    train, held = prepare_audio(cfg)
    assert len(train) + len(held) == len(_rows(corpus))
    for part in (train, held):
        assert {"label", "speaker", "path", "duration"} <= set(part.column_names)
        assert set(part["label"]) == set(kd.KEYWORDS)
    assert held["speaker"] and not set(held["speaker"]) & set(train["speaker"])
    batch = train.collator()([train[i] for i in range(4)], torch.Generator().manual_seed(0))
    assert tuple(batch["input_values"].shape) == (4, 16000) and int(batch["skipped"]) == 0


def test_default_corpus_is_built_aside_then_renamed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = kd.build_keyword_corpus
    built: list[Path] = []

    def small(out: Path) -> Path:  # the default's parameters, speakers aside: keep the test fast
        built.append(Path(out))
        assert Path(out).parent == tmp_path and Path(out).name.startswith(".keyword-demo-v1.build.")
        return real(out, speakers=SPEAKERS_SMALL[:1])

    monkeypatch.setattr(kd, "build_keyword_corpus", small)
    monkeypatch.setattr(kd, "SPEAKERS", SPEAKERS_SMALL[:1])
    monkeypatch.setenv("MULTISSL_CACHE", str(tmp_path))
    manifest = kd.default_keyword_corpus()
    assert manifest == tmp_path / "keyword-demo-v1" / "manifest.jsonl"
    assert len(_rows(manifest)) == len(kd.KEYWORDS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keyword-demo-v1"], "no build folder left behind"
    assert kd.default_keyword_corpus() == manifest and len(built) == 1, "built once"
    assert len(SPEAKERS) == 104
