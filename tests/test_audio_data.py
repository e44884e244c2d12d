"""Audio pipeline: duration batching, bad-file handling, collation, manifests."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from multissl.data.audio import (
    AudioCollator,
    AudioDataConfig,
    BadAudio,
    DurationBatchSampler,
    load_audio,
    load_utterances,
    padded_length,
)
from multissl.data.audio_splits import prepare_audio
from multissl.errors import ConfigError, DataError
from multissl.training.loader import make_loader

SR = 16000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("espeakng_loader")
    from multissl.data.speech_demo import build_speech_corpus

    return build_speech_corpus(tmp_path_factory.mktemp("speech") / "corpus", 24, seed=0)


def _tone(seconds: float, rate: int = SR, amp: float = 0.5, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.05, len(t))
    return (amp * np.sin(2 * np.pi * 220 * t) + noise).astype(np.float32)


def _sampler(lengths, budget, shuffle, drop_last, rank=0, world=1, seed=0) -> DurationBatchSampler:
    return DurationBatchSampler(lengths, budget, seed=seed, shuffle=shuffle, drop_last=drop_last, rank=rank, world_size=world)


def _epoch(s: DurationBatchSampler, epoch: int = 0, start: int = 0) -> list[list[tuple[int, int]]]:
    s.set_epoch(epoch, start)
    return list(s)


# ------------------------------------------------------------------------------- batching
LENGTHS = np.random.default_rng(1).uniform(1.2, 9.5, 300).__mul__(SR).astype(np.int64)
BUDGET = 400_000


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_sees_every_utterance_once(world: int) -> None:
    seen = [i for r in range(world) for b in _epoch(_sampler(LENGTHS, BUDGET, False, False, r, world)) for i, _ in b]
    assert sorted(seen) == list(range(len(LENGTHS)))


@pytest.mark.parametrize("world", [2, 3])
def test_train_ranks_get_equal_counts_within_budget(world: int) -> None:
    samplers = [_sampler(LENGTHS, BUDGET, True, True, r, world) for r in range(world)]
    batches = [_epoch(s) for s in samplers]
    assert len({len(b) for b in batches}) == 1 and all(len(s) == len(b) for s, b in zip(samplers, batches))
    seen = [i for rank in batches for b in rank for i, _ in b]
    assert len(seen) == len(set(seen))
    for rank in batches:
        for b in rank:
            idx = [i for i, _ in b]
            assert LENGTHS[idx].max() * len(idx) <= BUDGET
            assert len({s for _, s in b}) == 1  # one seed per batch


def test_batches_are_deterministic_resumable_and_reshuffled() -> None:
    a, b = _sampler(LENGTHS, BUDGET, True, True), _sampler(LENGTHS, BUDGET, True, True)
    first = _epoch(a, 0)
    assert first == _epoch(b, 0)
    assert _epoch(b, 0, start=3) == first[3:]
    assert _epoch(a, 1) != first
    assert _epoch(_sampler(LENGTHS, BUDGET, True, True, seed=1), 0) != first


def test_padding_is_small_on_speech(corpus: Path) -> None:
    """Bucketing alone (no rounding) pads little; with the default rounding (0.5 s) every batch's
    rounded size still fits the budget."""
    for pad in (0.0, 0.5):
        cfg = AudioDataConfig(manifest=str(corpus), validation_fraction=0, max_batch_samples=400_000, max_seconds=10.0,
                              pad_multiple_seconds=pad)
        train, _ = prepare_audio(cfg)
        for shuffle in (True, False):
            s = train.make_batch_sampler(batch_size=0, seed=0, shuffle=shuffle, drop_last=False, rank=0, world_size=1,
                                         split_tag=0)
            for epoch in range(3):
                s.set_epoch(epoch)
                if pad == 0:
                    assert s.padding_fraction() < 0.10
                assert all(padded_length(int(train.lengths[[i for i, _ in b]].max()), cfg.pad_multiple, cfg.max_samples)
                           * len(b) <= cfg.max_batch_samples for b in s)


def test_make_loader_uses_the_dataset_batch_sampler(corpus: Path) -> None:
    cfg = AudioDataConfig(manifest=str(corpus), validation_fraction=0, max_batch_samples=200_000, max_seconds=3.0)
    train, _ = prepare_audio(cfg)
    loader, positioner = make_loader(train, 8, train.collator(), seed=0, shuffle=True, drop_last=True,
                                     rank=0, world_size=1, split_tag=0)
    assert isinstance(positioner, DurationBatchSampler)
    batches = list(loader)
    assert len(batches) == len(positioner) > 0
    for batch in batches:
        assert batch["input_values"].numel() <= cfg.max_batch_samples
        assert batch["lengths"].max() <= 3 * SR


# ------------------------------------------------------------------------------- bad audio
@pytest.fixture()
def messy(tmp_path: Path) -> Path:
    d = tmp_path / "audio"
    (d / "sub").mkdir(parents=True)
    for i in range(3):
        sf.write(d / f"good{i}.wav", _tone(1.5 + i, seed=i), SR)
    sf.write(d / "sub" / "good.flac", _tone(2.0, seed=9), SR)
    sf.write(d / "rate8k.wav", _tone(2.0, rate=8000), 8000)
    sf.write(d / "stereo.wav", np.stack([_tone(2.0), _tone(2.0, amp=0.2, seed=3)], axis=1), SR)
    sf.write(d / "pcm8.wav", _tone(1.5), SR, subtype="PCM_U8")
    sf.write(d / "pcm24.wav", _tone(1.5), SR, subtype="PCM_24")
    sf.write(d / "silent.wav", np.zeros(2 * SR, dtype=np.float32), SR)
    whole = (d / "good0.wav").read_bytes()
    (d / "truncated.wav").write_bytes(whole[:30])  # cut inside the header
    (d / "headeronly.wav").write_bytes(whole[:44])  # a header, no samples
    (d / "empty.wav").write_bytes(b"")
    (d / "text.wav").write_text("this is not audio at all\n")
    (d / "notes.txt").write_text("ignored: not an audio extension\n")
    return d


def test_unreadable_files_are_skipped_with_one_warning(messy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds, _ = load_utterances(AudioDataConfig(files=[str(messy)], min_seconds=0.5))
    names = {Path(p).name for p in ds["path"]}
    assert names == {"good0.wav", "good1.wav", "good2.wav", "good.flac", "rate8k.wav", "stereo.wav",
                     "pcm8.wav", "pcm24.wav", "silent.wav"}
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "skipping 4 unreadable" in out[0]
    assert sum(n in out[0] for n in ("truncated.wav", "headeronly.wav", "empty.wav", "text.wav")) == 3  # first few named
    d = dict(zip((Path(p).name for p in ds["path"]), ds["duration"]))
    assert d["rate8k.wav"] == pytest.approx(2.0) and d["good2.wav"] == pytest.approx(3.5)


def test_collator_skips_silent_and_decodes_the_rest(messy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds, _ = load_utterances(AudioDataConfig(files=[str(messy)], min_seconds=0.5))
    rows = [ds[i] for i in range(len(ds))]
    collate = AudioCollator(SR, max_seconds=10.0, normalize=False)
    batch = collate(rows, torch.Generator().manual_seed(0))
    assert int(batch["skipped"]) == 1 and len(collate.warnings.named) == 1 and "silent.wav" in collate.warnings.named[0]
    assert "silent.wav" in capsys.readouterr().out
    assert batch["input_values"].shape[0] == len(rows) - 1
    kept = [r for r in rows if not r["path"].endswith("silent.wav")]
    lengths = dict(zip((Path(r["path"]).name for r in kept), batch["lengths"].tolist()))
    assert lengths["rate8k.wav"] == 2 * SR  # resampled, not skipped
    assert lengths["stereo.wav"] == 2 * SR
    i8, i24 = (next(i for i, r in enumerate(kept) if r["path"].endswith(n)) for n in ("pcm8.wav", "pcm24.wav"))
    ref = torch.from_numpy(_tone(1.5))
    assert torch.allclose(batch["input_values"][i24, : len(ref)], ref, atol=1e-4)
    assert torch.allclose(batch["input_values"][i8, : len(ref)], ref, atol=1.5 / 128)
    mono = load_audio(messy / "stereo.wav", SR)
    np.testing.assert_allclose(mono, (_tone(2.0) + _tone(2.0, amp=0.2, seed=3)) / 2, atol=1e-4)
    with pytest.raises(DataError, match="none of the 1 utterances.*silent.wav"):
        AudioCollator(SR, 10.0)([r for r in rows if r["path"].endswith("silent.wav")], torch.Generator())


def test_on_bad_audio_error_names_the_file(messy: Path) -> None:
    with pytest.raises(DataError) as err:
        load_utterances(AudioDataConfig(files=[str(messy)], on_bad_audio="error"))
    assert "\n" not in str(err.value) and any(n in str(err.value) for n in ("truncated.wav", "empty.wav", "text.wav", "headeronly.wav"))
    collate = AudioCollator(SR, 10.0, on_bad_audio="error")
    with pytest.raises(BadAudio, match="silent.wav: is silent") as err:
        collate([{"path": str(messy / "good0.wav")}, {"path": str(messy / "silent.wav")}], torch.Generator())
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------- collator
def test_collator_shapes_mask_crop_and_normalisation(tmp_path: Path) -> None:
    rows = []
    for i, secs in enumerate((0.7, 2.0, 5.0)):
        p = tmp_path / f"u{i}.wav"
        sf.write(p, _tone(secs, amp=0.3 + i * 0.2, seed=i) + 0.1 * i, SR)
        rows.append({"path": str(p)})
    collate = AudioCollator(SR, max_seconds=1.5, normalize=True)
    out = collate(rows, torch.Generator().manual_seed(7))
    x, mask, lengths = out["input_values"], out["attention_mask"], out["lengths"]
    assert x.dtype == torch.float32 and mask.dtype == torch.long and lengths.dtype == torch.long
    assert x.shape == mask.shape == (3, int(1.5 * SR)) and lengths.tolist() == [int(0.7 * SR), int(1.5 * SR), int(1.5 * SR)]
    assert torch.equal(mask.sum(1), lengths)
    for row, n in zip(x, lengths.tolist()):
        valid = row[:n].double()
        assert abs(valid.mean()) < 1e-4 and abs(valid.std(unbiased=False) - 1) < 1e-3
        assert torch.all(row[n:] == 0)
    again = collate(rows, torch.Generator().manual_seed(7))
    assert torch.equal(again["input_values"], x)
    other = collate(rows, torch.Generator().manual_seed(8))
    assert not torch.equal(other["input_values"][2], x[2])  # a different crop of the 5 s utterance


# ------------------------------------------------------------------------------- manifests
def _write_manifest(tmp_path: Path, kind: str, rows: list[dict]) -> Path:
    path = tmp_path / f"manifest.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "parquet":
        from datasets import Dataset

        Dataset.from_list(rows).to_parquet(str(path))
    else:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if kind == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    return path


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
def test_manifest_relative_paths_and_errors(tmp_path: Path, kind: str) -> None:
    (tmp_path / "clips").mkdir()
    rows = []
    for i in range(6):
        sf.write(tmp_path / "clips" / f"c{i}.wav", _tone(1.0 + i / 2, seed=i), SR)
        rows.append({"path": f"clips/c{i}.wav", "transcript": f"clip {i}", "speaker": f"s{i % 3}"})
    manifest = _write_manifest(tmp_path, kind, rows)
    train, held = prepare_audio(AudioDataConfig(manifest=str(manifest), validation_fraction=0.3))
    assert held is not None and len(train) + len(held) == 6
    assert not set(train.data["speaker"]) & set(held.data["speaker"])  # whole speakers held out
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in train.data["path"])
    assert {"path", "duration", "transcript", "speaker"} <= set(train.column_names)

    bad = _write_manifest(tmp_path, kind, rows + [{"path": "clips/missing.wav", "transcript": "x", "speaker": "s0"}])
    place = {"csv": "line 8", "tsv": "line 8", "jsonl": "line 7", "parquet": "row 7"}[kind]  # as an editor shows it
    with pytest.raises(DataError, match=rf"{place}: no such audio file: .*missing\.wav") as err:
        load_utterances(AudioDataConfig(manifest=str(bad)))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="no column 'file'"):
        load_utterances(AudioDataConfig(manifest=str(manifest), path_column="file"))


def test_missing_sources_and_bad_config(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        load_utterances(AudioDataConfig(files=[str(tmp_path / "nope")]))
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="holds no"):
        load_utterances(AudioDataConfig(files=[str(tmp_path / "e")]))
    sf.write(tmp_path / "short.wav", _tone(0.3), SR)
    with pytest.raises(DataError, match="min_seconds"):
        load_utterances(AudioDataConfig(files=[str(tmp_path / "short.wav")]))
    with pytest.raises(ConfigError, match="max_batch_samples"):
        AudioDataConfig(max_batch_samples=1000)
    with pytest.raises(ConfigError, match="at most one"):
        AudioDataConfig(files=["a"], manifest="b")


def test_dataset_source_with_embedded_bytes(tmp_path: Path) -> None:
    import io

    from datasets import Audio, Dataset

    blobs = []
    for i in range(4):
        buf = io.BytesIO()
        sf.write(buf, _tone(1.0 + i, seed=i), SR, format="WAV")
        blobs.append({"bytes": buf.getvalue(), "path": f"utt{i}.wav"})
    ds = Dataset.from_dict({"audio": blobs, "label": [0, 1, 0, 1]}).cast_column("audio", Audio())
    ds.save_to_disk(str(tmp_path / "ds"))  # an Audio feature: read as bytes, without torchcodec
    train, held = prepare_audio(AudioDataConfig(dataset=str(tmp_path / "ds"), validation_fraction=0.25))
    assert held is not None and len(train) + len(held) == 4 and "label" in train.column_names
    batch = train.collator()([train[i] for i in range(len(train))], torch.Generator())
    assert batch["input_values"].shape[0] == len(train)


@pytest.mark.parametrize("streaming", [False, True])
def test_dataset_dict_folder_is_read_by_split(tmp_path: Path, streaming: bool) -> None:
    """A folder saved from a DatasetDict (the split is picked), streamed with fewer rows than shards."""
    from datasets import Dataset, DatasetDict

    from multissl.data.audio_stream import stream_audio

    files = {split: [tmp_path / f"{split}{i}.wav" for i in range(3)] for split in ("train", "test")}
    for f in files["train"] + files["test"]:
        sf.write(f, _tone(1.5), SR)
    DatasetDict({split: Dataset.from_dict({"audio": [str(f) for f in fs]}) for split, fs in files.items()}
                ).save_to_disk(str(tmp_path / "dd"))
    cfg = AudioDataConfig(dataset=str(tmp_path / "dd"), split="test", validation_fraction=0.0,
                          streaming=streaming)
    if streaming:
        paths = [r["path"] for r in stream_audio(cfg)[0].source]
    else:
        paths = list(load_utterances(cfg)[0]["path"])
    assert sorted(Path(p).resolve() for p in paths) == [f.resolve() for f in files["test"]]
    with pytest.raises(DataError, match=r"has no split 'dev' \(splits: train, test\)"):
        (stream_audio if streaming else load_utterances)(dataclasses.replace(cfg, split="dev"))


# ------------------------------------------------------------------------------- streaming
def test_stream_batches_every_utterance_once_within_budget(corpus: Path, tmp_path: Path) -> None:
    from multissl.data.audio_stream import DurationStream

    rows = [{"path": str(p)} for p in sorted((corpus.parent / "wavs").glob("*.wav"))]
    sf.write(tmp_path / "short.wav", _tone(0.3), SR)  # under min_seconds: rides along marked, for the collator to count
    (tmp_path / "broken.wav").write_bytes(b"RIFF")  # unreadable header: passed on for the collator to count
    rows[5:5] = [{"path": str(tmp_path / "short.wav")}, {"path": str(tmp_path / "broken.wav")}]
    cfg = AudioDataConfig(max_seconds=3.0, max_batch_samples=160_000, shuffle_buffer=10)
    stream = DurationStream(rows, cfg, seed=0, shuffle=True, split_tag=0, rank=0)
    epochs = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        epochs.append(list(stream))
        seen = [r["path"] for batch, _ in epochs[-1] for r in batch if "_skip_reason" not in r]
        assert sorted(seen) == sorted(r["path"] for r in rows if "short" not in r["path"])
        marked = [r for batch, _ in epochs[-1] for r in batch if "_skip_reason" in r]
        assert [Path(r["path"]).name for r in marked] == ["short.wav"]
        for batch, _ in epochs[-1]:
            batch = [r for r in batch if "_skip_reason" not in r]  # not decoded: no part of the budget
            lengths = [min(sf.info(r["path"]).frames, cfg.max_samples) if "broken" not in r["path"] else 0 for r in batch]
            assert max(lengths) * len(batch) <= cfg.max_batch_samples
    assert [[r["path"] for r in b] for b, _ in epochs[0]] != [[r["path"] for r in b] for b, _ in epochs[1]]
    stream.set_epoch(1, start_batch=4)  # resume: the same batches, with the same seeds, from batch 4
    assert list(stream) == epochs[1][4:]


def test_streaming_prepare_reads_nothing_up_front(corpus: Path) -> None:
    train, held = prepare_audio(AudioDataConfig(manifest=str(corpus), streaming=True, validation_fraction=0.25))
    assert not hasattr(train, "__len__"), "a stream has no length (the trainer then needs max_steps)"
    loader, stream = make_loader(train, 0, train.collator(), seed=0, shuffle=True, drop_last=True, rank=0,
                                 world_size=1, split_tag=0)
    train_paths = {r["path"] for batch, _ in stream for r in batch}
    held_paths = {r["path"] for batch, _ in held.make_stream(batch_size=0, seed=0, shuffle=False, drop_last=False, rank=0,
                                                             world_size=1, split_tag=1) for r in batch}
    assert train_paths and held_paths and not train_paths & held_paths
    assert len(train_paths | held_paths) == len(corpus.read_text().splitlines())
    batch = next(iter(loader))
    assert batch["input_values"].ndim == 2 and int(batch["skipped"]) == 0


# ------------------------------------------------------------------------------- padding to a multiple
def test_padded_length_rounds_up_but_not_past_the_crop() -> None:
    assert padded_length(17_000, 8_000, 80_000) == 24_000 and padded_length(16_000, 8_000, 80_000) == 16_000
    assert padded_length(77_000, 8_000, 80_000) == 80_000
    assert padded_length(75_000, 8_000, 78_000) == 78_000  # 80_000 rounded, capped at the crop length
    assert padded_length(17_000, 0, 80_000) == 17_000
    assert padded_length(17_000, 8_000) == 24_000


def test_batches_padded_to_a_multiple_keep_the_budget_and_few_shapes(tmp_path: Path) -> None:
    """Each batch's padded size (its longest rounded up as the collator rounds it) x count fits the
    budget, and rounding leaves far fewer distinct padded lengths than utterance lengths."""
    cap = int(9.5 * SR)
    plain = _sampler(LENGTHS, BUDGET, True, False)
    rounded = DurationBatchSampler(LENGTHS, BUDGET, seed=0, shuffle=True, drop_last=False, pad_multiple=SR // 2, pad_cap=cap)
    widths = set()
    for batch in _epoch(rounded):
        width = padded_length(int(LENGTHS[[i for i, _ in batch]].max()), SR // 2, cap)
        assert width * len(batch) <= BUDGET and (width % (SR // 2) == 0 or width == cap)
        widths.add(width)
    assert len(widths) <= 18 < len({int(LENGTHS[[i for i, _ in b]].max()) for b in _epoch(plain)})
    assert plain.padding_fraction() < rounded.padding_fraction() < plain.padding_fraction() + 0.1


def test_collator_pads_a_batch_to_a_multiple_and_masks_the_padding(tmp_path: Path) -> None:
    for name, seconds in (("a.wav", 1.2), ("b.wav", 1.7)):
        sf.write(tmp_path / name, _tone(seconds), SR)
    rows = [{"path": str(tmp_path / n)} for n in ("a.wav", "b.wav")]
    batch = AudioCollator(SR, max_seconds=10.0, normalize=False, pad_multiple=SR // 2)(rows, torch.Generator())
    assert batch["input_values"].shape == (2, 2 * SR) and batch["lengths"].tolist() == [int(1.2 * SR), int(1.7 * SR)]
    assert batch["attention_mask"].sum(1).tolist() == batch["lengths"].tolist()
    assert not batch["input_values"][1, int(1.7 * SR):].any()
    unpadded = AudioCollator(SR, max_seconds=10.0, normalize=False)(rows, torch.Generator())
    assert unpadded["input_values"].shape == (2, int(1.7 * SR))
    torch.testing.assert_close(batch["input_values"][:, : int(1.7 * SR)], unpadded["input_values"])
    assert AudioCollator.from_config(AudioDataConfig()).pad_multiple == SR // 2  # the default: 0.5 s
    with pytest.raises(ConfigError, match="pad_multiple_seconds"):
        AudioDataConfig(pad_multiple_seconds=-1)
