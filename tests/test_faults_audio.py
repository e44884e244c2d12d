"""Bad audio input, kind by kind: each one loads, is converted (resampled, mixed down), is a counted
skip or is a one-line error; the skip totals count distinct files, whatever stage rejects them, and
stay exact over DataLoader workers, epochs and a resume. Manifest errors name the line as an editor
shows it."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from multissl_recipes import wav2vec2

from multissl import config
from multissl.data import audio_splits
from multissl.data.audio import (
    SKIP_LIST,
    AudioCollator,
    AudioDataConfig,
    AudioReport,
    AudioSkips,
    load_utterances,
    manifest_place,
)
from multissl.data.audio_stream import DurationStream
from multissl.data.audio_tasks import LabelledAudioDataConfig
from multissl.errors import DataError
from multissl.metrics import read_jsonl
from multissl.objectives.audio_classification import label_splits
from multissl.training.skips import DistinctTally, skip_id
from tests.conftest import assert_resume_is_exact
from tests.test_wav2vec2_recipe import _args

SR = 16000
GOOD = ("good0.wav", "good1.wav", "good2.wav", "good3.wav", "good4.wav", "good5.flac")

# file name -> (reason in the skip list, stage that rejects it); every kind the folder fixture holds
BAD: dict[str, tuple[str, str]] = {
    "gone.wav": ("dangling symlink to ", "listing"),
    "clip.m4a": ("unsupported audio format .m4a (MPEG-4 audio: AAC or ALAC)", "listing"),
    "empty.wav": ("cannot read the audio header (Format not recognised)", "probe"),
    "header_only.wav": ("holds no audio samples", "probe"),
    "random.wav": ("cannot read the audio header (Format not recognised)", "probe"),
    "short.wav": ("shorter than data.min_seconds=1.0 (0.40 s)", "probe"),
    "silent.wav": ("is silent (peak 0.0e+00)", "decode"),
}
CONVERTED = ("rate8k_stereo.wav",)  # another rate and two channels: resampled and mixed down, not skipped


def _tone(seconds: float, rate: int = SR, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.05, len(t))
    return (0.5 * np.sin(2 * np.pi * (180 + 40 * seed) * t) + noise).astype(np.float32)


def _messy_folder(root: Path) -> Path:
    """Good clips and one file of every bad kind, plus files that are not audio (ignored)."""
    d = root / "audio"
    (d / "sub").mkdir(parents=True)
    for i, name in enumerate(GOOD):
        sf.write(d / ("sub" if name.endswith(".flac") else "") / name, _tone(1.5 + 0.2 * i, seed=i), SR)
    sf.write(d / CONVERTED[0], np.stack([_tone(2.0, 8000, 5), _tone(2.0, 8000, 6)], axis=1), 8000)
    os.symlink(d / "deleted.wav", d / "gone.wav")
    (d / "clip.m4a").write_bytes(np.random.default_rng(1).bytes(4000))
    (d / "empty.wav").write_bytes(b"")
    (d / "header_only.wav").write_bytes((d / "good0.wav").read_bytes()[:44])
    (d / "random.wav").write_bytes(np.random.default_rng(2).bytes(6000))
    sf.write(d / "short.wav", _tone(0.4), SR)
    sf.write(d / "silent.wav", np.zeros(2 * SR, dtype=np.float32), SR)
    (d / "notes.txt").write_text("transcripts live elsewhere\n")
    (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return d


def _where(folder: Path, name: str) -> str:
    path = next(p for p in folder.rglob("*") if p.name == name)
    return str(path.absolute() if path.is_symlink() else path.resolve())


def _skip_list(out: Path) -> dict[str, str]:
    lines = (out / "data" / SKIP_LIST).read_text(encoding="utf-8").splitlines()
    listed = dict(line.split("\t", 1) for line in lines)
    assert len(listed) == len(lines), "each file listed once"
    return listed


def _assert_listed(out: Path, folder: Path, names: dict[str, tuple[str, str]]) -> None:
    listed = _skip_list(out)
    assert set(listed) == {_where(folder, n) for n in names}
    for name, (reason, _) in names.items():
        assert listed[_where(folder, name)].startswith(reason), (name, listed[_where(folder, name)])


@pytest.fixture()
def into(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Runs the wav2vec2 recipe with its data prepared for an ``output_dir`` (where the skip list is
    written), whether or not the recipe passes it itself."""
    def run(out: Path, args: list[str]) -> Any:
        prepare = audio_splits.prepare_audio
        monkeypatch.setattr(wav2vec2, "prepare_audio", lambda cfg, seed=0, output_dir=None: prepare(cfg, seed, out))
        return wav2vec2.main(args)
    return run


def _pretrain_args(out: Path, folder: Path, steps: int, **extra: Any) -> list[str]:
    # 2-3 clips a batch: an epoch is 3-4 batches, so 8 steps draw the silent clip in 2-3 epochs
    extra = {"trainer.log_every": 4, "data.validation_fraction": 0, "data.max_batch_samples": 100000,
             "data.max_seconds": 2.5, "trainer.warmup_steps": 2, "loss.num_negatives": 10, **extra}
    return _args(out, folder, steps, **extra) + [f"data.files=[{folder}]", "data.manifest="]


def _times_drawn(args: list[str], name: str, steps: int) -> int:
    cfg = config.load(wav2vec2.Wav2Vec2Config, args)
    train, _ = audio_splits.prepare_audio(cfg.data, cfg.trainer.seed)
    index = [Path(p).name for p in train.data["path"]].index(name)
    sampler = train.make_batch_sampler(batch_size=0, seed=cfg.trainer.seed, shuffle=True, drop_last=True, rank=0,
                                       world_size=1, split_tag=0)
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < steps:
        sampler.set_epoch(epoch)
        batches += [[i for i, _ in b] for b in sampler]
        epoch += 1
    return sum(index in b for b in batches[:steps])


# ------------------------------------------------------------------------------- loading, kind by kind
def test_loading_counts_each_bad_kind_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _messy_folder(tmp_path)
    report = AudioReport()
    ds, _ = load_utterances(AudioDataConfig(files=[str(folder)]), report)
    loaded = sorted(Path(p).name for p in ds["path"])
    assert loaded == sorted([*GOOD, *CONVERTED, "silent.wav"]), "silent passes the header probe"
    at_load = {n: v for n, v in BAD.items() if v[1] != "decode"}
    reasons = dict(report.pairs())
    assert set(reasons) == {_where(folder, n) for n in at_load}
    for name, (reason, _) in at_load.items():
        assert reasons[_where(folder, name)].startswith(reason)
    assert report.looked_at == len(GOOD) + len(CONVERTED) + len(BAD) == 14
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"warning: skipping 1 dangling symlink(s) to audio that is not there: {folder / 'gone.wav'} -> "
        f"{folder / 'deleted.wav'}",
        "warning: skipping 1 audio file(s) in a format libsndfile cannot decode (.m4a (MPEG-4 audio: AAC or ALAC)): "
        f"{folder / 'clip.m4a'}; convert them to FLAC or WAV (e.g. ffmpeg -i clip.m4a clip.flac)",
        f"warning: skipping 3 unreadable audio file(s) of 14: {folder / 'empty.wav'} (cannot read the audio header "
        f"(Format not recognised)); {folder / 'header_only.wav'} (holds no audio samples); {folder / 'random.wav'} "
        "(cannot read the audio header (Format not recognised))",
        f"warning: skipping 1 audio file(s) shorter than data.min_seconds=1.0: {folder / 'short.wav'} (0.40 s)",
    ]
    rate8k = ds["duration"][[Path(p).name for p in ds["path"]].index(CONVERTED[0])]
    assert rate8k == pytest.approx(2.0)
    batch = AudioCollator(SR, 10.0)([{"path": _where(folder, CONVERTED[0])}], torch.Generator())
    assert batch["lengths"].tolist() == [2 * SR] and int(batch["skipped"]) == 0, "resampled to 16 kHz, mono"


@pytest.mark.parametrize("name", ["gone.wav", "clip.m4a", "empty.wav", "header_only.wav", "random.wav"])
def test_on_bad_audio_error_stops_at_each_bad_kind(tmp_path: Path, name: str) -> None:
    d = tmp_path / "one"
    d.mkdir()
    sf.write(d / "good.wav", _tone(1.5), SR)
    if name == "gone.wav":
        os.symlink(d / "deleted.wav", d / name)
    else:
        (d / name).write_bytes((_messy_folder(tmp_path) / name).read_bytes())
    with pytest.raises(DataError) as err:
        load_utterances(AudioDataConfig(files=[str(d)], on_bad_audio="error"))
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(d / name) if name == "gone.wav" else str((d / name).resolve()))
    assert BAD[name][0] in message and "data.on_bad_audio" in message
    short = tmp_path / "short_only"
    short.mkdir()
    sf.write(short / "a.wav", _tone(0.4), SR)
    sf.write(short / "b.wav", _tone(1.5), SR)
    ds, _ = load_utterances(AudioDataConfig(files=[str(short)], on_bad_audio="error"))
    assert [Path(p).name for p in ds["path"]] == ["b.wav"], "too short is a filter: skipped even then"


def test_folders_without_usable_audio_are_one_line_errors(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("x")
    (notes / "b.json").write_text("{}")
    with pytest.raises(DataError, match=r"holds no audio files \(.*\) \(only 2 other file\(s\), which are not audio\)$"):
        load_utterances(AudioDataConfig(files=[str(notes)]))
    m4a = tmp_path / "m4a"
    m4a.mkdir()
    (m4a / "a.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A ")
    with pytest.raises(DataError, match=r"no readable audio file \(of 1; 1 skipped: 1 unsupported\)$"):
        load_utterances(AudioDataConfig(files=[str(m4a)]))
    os.symlink(tmp_path / "nowhere.wav", tmp_path / "named.wav")
    with pytest.raises(DataError, match=r"no such file or folder: .*named\.wav \(a dangling symlink to .*nowhere\.wav\)$"):
        load_utterances(AudioDataConfig(files=[str(tmp_path / "named.wav")]))


# ------------------------------------------------------------------------------- a whole run
def test_run_counts_distinct_files_over_workers_epochs_and_resume(tmp_path: Path, into: Any,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Every kind in one folder: the run completes, the logged total is the number of distinct bad
    files (the silent clip drawn in several epochs, by two workers, counts once), the list names each
    with its reason, and a resumed run ends with the same total and list."""
    folder = _messy_folder(tmp_path)
    out = tmp_path / "run"
    args = _pretrain_args(out, folder, 8, **{"trainer.num_workers": 2, "trainer.save_every": 4})
    assert _times_drawn(args, "silent.wav", 8) >= 2, "the silent clip must come up more than once"
    resumed = assert_resume_is_exact(lambda a: into(out, a), args, out, 8)
    assert resumed.state.seen["skipped_audio_files"] == len(BAD)
    logged = [r["data/skipped_audio_files"] for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    assert logged == [len(BAD), len(BAD)]
    _assert_listed(out, folder, BAD)
    printed = capsys.readouterr().out
    assert f"audio files: {len(BAD)} skipped" in printed and f"audio files: {2 * len(BAD)}" not in printed
    state = json.loads((out / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["seen"]["skipped_audio_files"] == len(BAD)


def test_a_clean_rerun_clears_the_stale_list(tmp_path: Path, into: Any) -> None:
    clean = tmp_path / "clean"
    clean.mkdir()
    for i in range(4):
        sf.write(clean / f"c{i}.wav", _tone(1.5 + 0.25 * i, seed=i), SR)
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    (out / "data" / SKIP_LIST).write_text("/old/file.wav\tfrom an earlier run\n")
    result = into(out, _pretrain_args(out, clean, 2))
    assert not (out / "data" / SKIP_LIST).exists() and result.state.seen.get("skipped_audio_files", 0) == 0


def test_streamed_run_counts_the_same_files(tmp_path: Path, into: Any) -> None:
    """Streaming reads nothing up front: unreadable files fail in the collator and too-short clips
    ride along marked; the total is still each bad file once."""
    folder = _messy_folder(tmp_path)
    out = tmp_path / "run"
    args = _pretrain_args(out, folder, 8, **{"data.streaming": True, "data.shuffle_buffer": 16})
    result = into(out, args)
    assert result.state.step == 8 and result.state.seen["skipped_audio_files"] == len(BAD)
    listed = _skip_list(out)
    assert set(listed) == {_where(folder, n) for n in BAD}
    assert listed[_where(folder, "empty.wav")].startswith("cannot decode audio")  # found when decoded
    assert listed[_where(folder, "short.wav")] == BAD["short.wav"][0]


def test_stream_carries_too_short_clips_to_the_collator(tmp_path: Path) -> None:
    rows = [{"path": str(tmp_path / f"u{i}.wav")} for i in range(6)]
    for i, row in enumerate(rows):
        sf.write(row["path"], _tone(0.4 if i in (1, 4) else 1.5, seed=i), SR)
    stream = DurationStream(rows, AudioDataConfig(max_seconds=2.0, max_batch_samples=64000, shuffle_buffer=3),
                            seed=0, shuffle=True, split_tag=0, rank=0)
    batches = [b for b, _ in stream]
    assert sorted(r["path"] for b in batches for r in b) == sorted(r["path"] for r in rows), "none lost"
    marked = [r["path"] for b in batches for r in b if "_skip_reason" in r]
    assert sorted(marked) == [rows[1]["path"], rows[4]["path"]]
    collate = AudioCollator(SR, 2.0)
    reasons = [p for b in batches for p, _ in collate(b, torch.Generator())["skip_reasons"]]
    assert sorted(reasons) == sorted(marked)


# ------------------------------------------------------------------------------- bookkeeping
def test_skips_are_counted_once_over_processes_and_listed_by_process_zero(tmp_path: Path) -> None:
    listed = (("/a.m4a", "unsupported"), ("/b.wav", "unreadable"))
    collate = AudioCollator(listed_skips=listed, skip_dir=str(tmp_path))
    batch = {"skip_reasons": [("/c.wav", "is silent"), ("/c.wav", "is silent")], "skipped": torch.tensor(2)}
    main = AudioSkips(collate)
    main.setup(0)
    reported = [main.count(batch), main.count(batch), main.count({"skip_reasons": []})]
    assert [sorted(r.ids) for r in reported] == [sorted(skip_id(p) for p in ("/a.m4a", "/b.wav", "/c.wav")), [], []]
    main.note({"skip_reasons": [("/d.wav", "is silent")]})  # an eval batch: reported with the next one
    assert main.count({"skip_reasons": []}).ids == (skip_id("/d.wav"),)
    assert list(_skip_list(tmp_path)) == ["/a.m4a", "/b.wav", "/c.wav", "/d.wav"]
    other = AudioSkips(collate)
    other.setup(1)  # the listing is the same on every process: process 0 reports it
    from_other = other.count(batch)
    assert from_other.ids == (skip_id("/c.wav"),) and list(_skip_list(tmp_path)) == ["/a.m4a", "/b.wav", "/c.wav", "/d.wav"]
    tally = DistinctTally()  # the trainer's count over both processes: /c.wav, met by each, once
    for unit in (reported[0], from_other):
        tally.add("skipped_audio_files", unit)
    assert tally.sync(lambda mine: [mine]) == {"skipped_audio_files": 3}
    again = AudioSkips(collate)
    again.setup(0)
    again.load_state_dict(main.state_dict())
    assert again.count(batch).ids == () and again.count({"skip_reasons": [("/e.wav", "x")]}).ids == (skip_id("/e.wav"),)


def test_labelled_audio_keeps_the_listing_skips(tmp_path: Path) -> None:
    """Fine-tuning splits (selected, relabelled) still carry what loading left out to the collator."""
    rows = []
    for i in range(8):
        sf.write(tmp_path / f"c{i}.wav", _tone(0.3 if i == 3 else 1.2, seed=i), SR)
        rows.append({"path": f"c{i}.wav", "label": "ab"[i % 2], "speaker": f"s{i % 4}"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = LabelledAudioDataConfig(manifest=str(manifest), validation_fraction=0.25)
    train, held, _, _ = label_splits(cfg, lambda: manifest, output_dir=tmp_path / "out")
    collate = train.collator()
    assert collate.listed_skips == ((str(tmp_path / "c3.wav"), "shorter than data.min_seconds=1.0 (0.30 s)"),)
    assert collate.skip_dir == str(tmp_path / "out") and held.collator().listed_skips == ()


# ------------------------------------------------------------------------------- manifests
def _good_clips(folder: Path, n: int) -> list[str]:
    (folder / "clips").mkdir(parents=True)
    for i in range(n):
        sf.write(folder / "clips" / f"c{i}.wav", _tone(1.2, seed=i), SR)
    return [f"clips/c{i}.wav" for i in range(n)]


def test_manifest_error_names_the_line_an_editor_shows(tmp_path: Path) -> None:
    """A dangling symlink on data row 29 of a CSV is on line 30 (the header is line 1); blank lines
    and quoted line breaks move it further; JSON Lines count every line; parquet has rows only."""
    paths = _good_clips(tmp_path, 35)
    os.symlink(tmp_path / "clips" / "deleted.wav", tmp_path / "clips" / "link.wav")
    paths[28] = "clips/link.wav"
    with (tmp_path / "m.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "transcript"])
        w.writerows([p, f"clip {i}"] for i, p in enumerate(paths))
    with pytest.raises(DataError) as err:
        wav2vec2.main([f"data.manifest={tmp_path / 'm.csv'}", f"trainer.output_dir={tmp_path / 'o'}"])
    assert str(err.value) == (f"{tmp_path / 'm.csv'}: line 30: dangling symlink (to {tmp_path / 'clips' / 'deleted.wav'}): "
                              f"{tmp_path / 'clips' / 'link.wav'}")
    with (tmp_path / "m.tsv").open("w", newline="") as fh:
        fh.write("path\ttranscript\n\n")
        for i, p in enumerate(paths):
            fh.write(f'{p}\t"two\nlines"\n' if i == 3 else f"{p}\tclip {i}\n")
    assert manifest_place(tmp_path / "m.tsv", 29) == "line 32"
    with pytest.raises(DataError, match=r"m\.tsv: line 32: dangling symlink"):
        load_utterances(AudioDataConfig(manifest=str(tmp_path / "m.tsv")))
    lines = [json.dumps({"path": p}) for p in paths]
    lines.insert(10, "")
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"m\.jsonl: line 30: dangling symlink"):
        load_utterances(AudioDataConfig(manifest=str(tmp_path / "m.jsonl")))
    (tmp_path / "m.json").write_text(json.dumps([{"path": p} for p in paths], indent=1))
    assert manifest_place(tmp_path / "m.json", 29) == f"line {2 + 3 * 28}"
    from datasets import Dataset

    Dataset.from_list([{"path": p} for p in paths]).to_parquet(str(tmp_path / "m.parquet"))
    with pytest.raises(DataError, match=r"m\.parquet: row 29: dangling symlink"):
        load_utterances(AudioDataConfig(manifest=str(tmp_path / "m.parquet")))
    missing = [*paths[:5], "clips/nope.wav"]
    (tmp_path / "n.jsonl").write_text("".join(json.dumps({"path": p}) + "\n" for p in missing))
    with pytest.raises(DataError, match=r"n\.jsonl: line 6: no such audio file: .*nope\.wav$"):
        load_utterances(AudioDataConfig(manifest=str(tmp_path / "n.jsonl")))
