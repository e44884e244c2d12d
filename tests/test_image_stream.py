"""Streamed images (``data.streaming=true``) for the image-SSL recipes: a save_to_disk dataset and a
folder train without being materialised, hold out the same images as when loaded whole, split over
processes without overlap, resume exactly, and count the bad images they skip. Tiny on purpose:
16 px, batches of 8, a few steps."""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from multissl.data.image_data import ImageDataConfig, ImageStream, prepare_images, stream_images
from multissl.data.image_text import heldout_key
from multissl.metrics import read_jsonl
from multissl.training.loader import make_loader
from tests.test_image_ssl import _args

CLASSES = ["red", "green", "blue"]
SMALL_BATCH = {"trainer.batch_size": 8, "trainer.eval_batch_size": 8, "data.shuffle_buffer": 16}


def _png(i: int) -> bytes:
    """A 16 px image that differs by ``i`` (so each has its own CRC, the held-out key of embedded bytes)."""
    from PIL import Image

    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    arr[..., i % 3] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A save_to_disk folder of 48 embedded PNGs with ClassLabel labels."""
    import datasets

    folder = tmp_path_factory.mktemp("images") / "ds"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": _png(i), "path": None} for i in range(48)],
                                     "label": [i % 3 for i in range(48)]}, features=features)
    ds.save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imagefolder of 42 PNG files in class sub-folders."""
    root = tmp_path_factory.mktemp("folder")
    for i in range(42):
        sub = root / CLASSES[i % 3]
        sub.mkdir(exist_ok=True)
        (sub / f"img{i:03d}.png").write_bytes(_png(100 + i))
    return root


def _simclr(out: Path, steps: int, **extra: object) -> list[str]:
    return _args(out, steps, "simclr", **{**SMALL_BATCH, "data.streaming": "true", **extra})


def _rows(side: object) -> list[tuple[str, str, int]]:
    """``(held-out key, file path, label)`` of every row: files by path, embedded images by key (a
    stream names them by key, as its row numbers restart in each process's shard)."""
    rows = side.rows if isinstance(side, ImageStream) else side.data  # type: ignore[attr-defined]
    return sorted((heldout_key(r["path"], r["bytes"]), r["path"] if r["bytes"] is None else "", r["label"]) for r in rows)


# ------------------------------------------------------------------------------- (1) trains and exports
def test_simclr_trains_on_a_streamed_dataset_and_exports(saved: Path, tmp_path: Path) -> None:
    from multissl_recipes import simclr

    out = tmp_path / "run"
    result = simclr.main(_simclr(out, 4, **{"data.dataset": saved}))
    assert result.state.step == 4
    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    assert len(train) == 4 and all(math.isfinite(r["train/loss"]) for r in train)
    assert any("eval/loss" in r and math.isfinite(r["eval/loss"]) for r in records), "the held-out stream is evaluated"
    assert (out / "model" / "config.json").is_file() and (out / "model" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------- (2) same split, sharded
@pytest.fixture(scope="module")
def parquet(saved: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same rows as parquet shards in a folder (what `load_dataset` streams from the Hub, too)."""
    import datasets

    root = tmp_path_factory.mktemp("parquet")
    ds = datasets.load_from_disk(str(saved))
    for k in range(2):
        ds.shard(2, k, contiguous=True).to_parquet(str(root / f"train-{k:05d}-of-00002.parquet"))
    return root


@pytest.mark.parametrize("source", ["dataset", "parquet", "files"])
def test_streamed_split_equals_the_loaded_split(source: str, saved: Path, parquet: Path, folder: Path) -> None:
    cfg = ImageDataConfig(files=[str(folder)]) if source == "files" else \
        ImageDataConfig(dataset=str(saved if source == "dataset" else parquet))
    train, held = prepare_images(cfg)
    s_train, s_held = stream_images(dataclasses.replace(cfg, streaming=True))
    assert held is not None and s_held is not None
    assert len(held) > 0 and len(train) > 0, "a real split, not the tiny-corpus fallback"
    assert _rows(s_train) == _rows(train) and _rows(s_held) == _rows(held)
    assert s_train.classnames == train.classnames == (sorted(CLASSES) if source == "files" else CLASSES)
    if source != "files":  # embedded bytes: the key is the bytes' CRC, the same on both sides
        assert sorted(r["bytes"] for r in s_held.rows) == sorted(held.data["bytes"])
        assert all(r["path"] == f"{cfg.dataset}[{heldout_key('', r['bytes'])}]" for r in s_held.rows)


def test_two_processes_read_disjoint_shards_of_the_train_stream(saved: Path) -> None:
    train, _ = stream_images(ImageDataConfig(dataset=str(saved), streaming=True, shuffle_buffer=16))
    kw = {"batch_size": 8, "seed": 0, "shuffle": True, "drop_last": False, "world_size": 2, "split_tag": 0}
    parts = [[r["path"] for batch, _ in train.make_stream(rank=rank, **kw) for r in batch] for rank in (0, 1)]
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(r["path"] for r in train.rows)


def test_stream_shuffles_by_epoch_and_replays_from_a_batch(saved: Path) -> None:
    train, _ = stream_images(ImageDataConfig(dataset=str(saved), streaming=True, shuffle_buffer=16))
    stream = train.make_stream(batch_size=8, seed=3, shuffle=True, drop_last=True, rank=0, world_size=1, split_tag=0)
    epochs = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        epochs.append([([r["path"] for r in batch], seed) for batch, seed in stream])
    assert all(len(paths) == 8 for paths, _ in epochs[0]), "training keeps full batches only"
    assert epochs[0] != epochs[1]
    stream.set_epoch(1, start_batch=2)
    assert [([r["path"] for r in batch], seed) for batch, seed in stream] == epochs[1][2:]


# ------------------------------------------------------------------------------- (3) resume
def test_streaming_resume_is_exact(saved: Path, tmp_path: Path) -> None:
    """Checkpoint at step 3 (mid-epoch: 39 training rows in buffers of 16 make 4 full batches of 8), resume, cross into epoch 2."""
    from multissl_recipes import simclr

    from tests.conftest import assert_resume_is_exact

    out = tmp_path / "run"
    args = _simclr(out, 6, **{"data.dataset": saved, "trainer.save_every": 3, "trainer.eval_every": 0})
    assert_resume_is_exact(simclr.main, args, out, 6)


# ------------------------------------------------------------------------------- (4) bad images
def test_a_corrupt_image_in_the_stream_is_skipped_and_counted(tmp_path: Path) -> None:
    """16 files (one corrupt), no held-out side: 2 batches an epoch, so 4 steps meet the bad file twice
    and count it once; with trainer.num_workers=2, which a stream accepts (it is read in this process,
    see the last test)."""
    from multissl_recipes import simclr

    files = tmp_path / "files"
    files.mkdir()
    for i in range(15):
        (files / f"ok{i:02d}.png").write_bytes(_png(200 + i))
    (files / "broken.png").write_bytes(b"this is not a png")
    out = tmp_path / "run"
    result = simclr.main(_simclr(out, 4, **{"data.files": f"[{files}]", "data.validation_fraction": 0,
                                            "trainer.eval_every": 0, "trainer.num_workers": 2}))
    assert result.state.step == 4
    train = [r for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    assert all(math.isfinite(r["train/loss"]) for r in train)
    assert train[-1]["data/skipped_images"] == 1


# ------------------------------------------------------------------------------- (5) workers
def test_workers_give_the_same_batches_as_none(saved: Path) -> None:
    """A stream is read in the main process whatever ``trainer.num_workers`` says (a `datasets` stream
    in DataLoader workers would give each worker only some shards); the batches are the same."""
    train, _ = stream_images(ImageDataConfig(dataset=str(saved), streaming=True, shuffle_buffer=16))

    def collate(samples: list[dict], generator: torch.Generator) -> tuple[list[str], int]:
        return [s["path"] for s in samples], int(torch.randint(0, 2**31, (1,), generator=generator))

    def batches(workers: int) -> list[tuple[list[str], int]]:
        loader, positioner = make_loader(train, 8, collate, seed=0, shuffle=True, drop_last=True, rank=0, world_size=1,
                                         split_tag=0, num_workers=workers)
        positioner.set_epoch(1)
        return list(loader)

    assert batches(2) == batches(0)


# ------------------------------------------------------------------------------- config
def test_config_checks_the_buffer_and_fine_tuning_refuses_streams() -> None:
    from multissl.errors import ConfigError
    from multissl.objectives.image_classification import LabelledImageDataConfig

    with pytest.raises(ConfigError, match="data.shuffle_buffer"):
        ImageDataConfig(streaming=True, shuffle_buffer=0)
    with pytest.raises(ConfigError, match="data.streaming"):
        LabelledImageDataConfig(streaming=True)
