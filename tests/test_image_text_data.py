"""Image-text pipeline: sources, bad images, mode conversion, seeded transforms, the shapes demo."""

from __future__ import annotations

import csv
import io
import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multissl.data import shapes_demo
from multissl.data.image_text import (
    ImageTextCollator,
    ImageTextDataConfig,
    ImageTextDataset,
    ImageTextStream,
    prepare_image_text,
)
from multissl.data.images import load_image
from multissl.data.shapes_demo import CLASSNAMES, ZERO_SHOT_TEMPLATES, build_shapes_corpus
from multissl.errors import ConfigError, DataError
from multissl.training.loader import make_loader, rows

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 72-image corpus (two rounds of the 36 classes); returns its folder."""
    return build_shapes_corpus(tmp_path_factory.mktemp("shapes") / "corpus", 72, seed=0).parent


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """Identity transform for checking pixel values: (3, H, W) float in 0..255."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float()


def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(size: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _write_folder(root: Path, images: dict[str, bytes], captions: dict[str, object] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for name, data in images.items():
            (root / name).write_bytes(data)
            f.write(json.dumps({"file_name": name, "text": (captions or {}).get(name, f"a picture called {name}")}) + "\n")
    return root


def _collator(tokenizer, transform=_to_tensor, **kw) -> ImageTextCollator:
    return ImageTextCollator(transform, tokenizer, **kw)


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------- shapes demo
def test_shapes_corpus_is_byte_identical_balanced_and_captioned(tmp_path: Path, shapes: Path) -> None:
    again = build_shapes_corpus(tmp_path / "again", 72, seed=0).parent
    files = sorted(p.relative_to(shapes) for p in shapes.rglob("*") if p.is_file())
    assert len(files) == 72 + 2  # images, metadata.jsonl, corpus.json
    assert all((shapes / f).read_bytes() == (again / f).read_bytes() for f in files)
    prefix = build_shapes_corpus(tmp_path / "prefix", 40, seed=0).parent  # image i depends on (seed, i) alone
    assert (prefix / "images" / "000040.png").read_bytes() == (shapes / "images" / "000040.png").read_bytes()
    other = build_shapes_corpus(tmp_path / "other", 8, seed=1).parent
    assert (other / "images" / "000001.png").read_bytes() != (shapes / "images" / "000001.png").read_bytes()

    rows_ = [json.loads(line) for line in (shapes / "metadata.jsonl").read_text().splitlines()]
    counts = {c: sum(r["label"] == c for r in rows_) for c in CLASSNAMES}
    assert len(CLASSNAMES) >= 36 and set(counts.values()) == {2}  # dealt in rounds of all classes
    for r in rows_:
        assert len(r["captions"]) >= 3 and all(r["label"] in c for c in r["captions"])
        assert r["captions"][0].startswith(("a small ", "a large "))
    img = Image.open(shapes / rows_[0]["file_name"])
    assert img.size == (64, 64) and img.mode == "RGB"
    assert all("{}" in t for t in ZERO_SHOT_TEMPLATES)


def test_main_shape_has_its_colour(shapes: Path) -> None:
    """The named colour is really in the picture (more of it than of any other palette colour)."""
    for r in [json.loads(line) for line in (shapes / "metadata.jsonl").read_text().splitlines()][:12]:
        px = np.asarray(Image.open(shapes / r["file_name"]), dtype=np.float32).reshape(-1, 3)
        near = {name: int((np.abs(px - rgb).max(axis=1) < 30).sum()) for name, rgb in shapes_demo.COLOURS.items()}
        assert max(near, key=near.get) == r["label"].split()[0]


def test_default_corpus_is_built_once_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULTISSL_CACHE", str(tmp_path))
    monkeypatch.setattr(shapes_demo, "DEFAULT_SIZE", 50)
    train, held = prepare_image_text(ImageTextDataConfig())
    meta = tmp_path / "shapes-demo-v1" / "metadata.jsonl"
    assert meta.is_file() and len(train) + len(held) == 50 and train.source == "shapes demo (embedded)"
    assert [p.name for p in tmp_path.iterdir()] == ["shapes-demo-v1"]  # no temporary folders left
    streamed, _ = prepare_image_text(ImageTextDataConfig(streaming=True))
    assert streamed.classnames == CLASSNAMES and all(CLASSNAMES[r["label"]] in r["captions"][0] for r in streamed)
    stamp = meta.stat().st_mtime_ns
    assert shapes_demo.default_shapes_corpus() == meta and meta.stat().st_mtime_ns == stamp
    monkeypatch.setattr(shapes_demo, "DEFAULT_SIZE", 51)  # other parameters: the stale corpus is replaced
    assert len(shapes_demo.default_shapes_corpus().read_text().splitlines()) == 51
    assert [p.name for p in tmp_path.iterdir()] == ["shapes-demo-v1"]


# ------------------------------------------------------------------------------- sources
def test_imagefolder_metadata_jsonl(shapes: Path, tokenizer) -> None:
    train, held = prepare_image_text(ImageTextDataConfig(files=[str(shapes)]), seed=0)
    assert isinstance(train, ImageTextDataset) and len(train) + len(held) == 72 and len(held) > 0
    assert set(train.column_names) == {"path", "captions", "label"} and not hasattr(train, "make_batch_sampler")
    assert not set(train["path"]) & set(held["path"])
    assert train.classnames == CLASSNAMES and held.classnames == CLASSNAMES
    row = train[0]
    assert Path(row["path"]).is_file() and len(row["captions"]) == 4
    assert CLASSNAMES[row["label"]] in row["captions"][0]
    again, held2 = prepare_image_text(ImageTextDataConfig(files=[str(shapes / "metadata.jsonl")]), seed=7)
    assert list(again["path"]) == list(train["path"]) and list(held2["path"]) == list(held["path"])  # hash split: seed-independent
    batch = _collator(tokenizer, open_clip.image_transform(32, is_train=True))(rows(train, [0, 1, 2]), _g())
    assert batch["images"].shape == (3, 3, 32, 32) and batch["texts"].shape == (3, 77)
    assert batch["labels"].tolist() == list(train["label"])[:3] and int(batch["skipped"]) == 0


def test_imagefolder_metadata_csv_merges_rows_of_one_image(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    (root / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "sub/c.png"):
        (root / name).write_bytes(_png(Image.new("RGB", (8, 8), "red")))
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["file_name", "caption", "label"], ["a.png", "a red square", "cat"], ["a.png", "red!", "cat"],
                     ["b.png", "a b", "dog"], ["sub/c.png", "c", ""]])
    train, held = prepare_image_text(ImageTextDataConfig(files=[str(root)], validation_fraction=0.0))
    assert held is None and len(train) == 3
    by_name = {Path(p).name: i for i, p in enumerate(train["path"])}
    assert train[by_name["a.png"]]["captions"] == ["a red square", "red!"]
    assert train.classnames == ["cat", "dog"]
    assert [train[by_name[n]]["label"] for n in ("a.png", "b.png", "c.png")] == [0, 1, -1]


@pytest.mark.parametrize("suffix,tabs", [(".csv", False), (".tsv", True), (".csv", True)])
def test_open_clip_csv(tmp_path: Path, tokenizer, suffix: str, tabs: bool) -> None:
    (tmp_path / "imgs").mkdir()
    rows_ = []
    for i in range(6):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(_png(_noise(20, i), "JPEG"))
        rows_ += [[f"imgs/{i}.jpg", f"noise number {i}"], [f"imgs/{i}.jpg", f"static {i}"]]
    table = tmp_path / f"train{suffix}"
    with open(table, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t" if tabs else ",")
        w.writerows([["filepath", "title"], *rows_])
    train, held = prepare_image_text(ImageTextDataConfig(csv=str(table)))
    assert len(train) + len(held) == 6 and len(held) >= 1 and train.classnames is None
    assert all(len(c) == 2 for c in train["captions"])
    eval_collate = _collator(tokenizer, open_clip.image_transform(16, is_train=False), sample_caption=False)
    batch = eval_collate(rows(train, [0, 1]), _g())
    assert batch["labels"].tolist() == [-1, -1]
    assert torch.equal(batch["texts"], tokenizer([train[0]["captions"][0], train[1]["captions"][0]]))


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet"])
def test_dataset_with_embedded_bytes_and_classlabel(tmp_path: Path, tokenizer, kind: str, capsys) -> None:
    import datasets

    images = [{"bytes": _png(Image.new("RGB", (12, 12), c)), "path": None} for c in ("red", "green", "blue", "white")]
    ds = datasets.Dataset.from_dict(
        {"image": images, "text": [["red", "crimson"], ["green"], [], ["white"]], "label": [0, 1, 2, 0]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.List(datasets.Value("string")),
                                    "label": datasets.ClassLabel(names=["warm", "leafy", "cool"])}),
    )
    folder = tmp_path / "ds"
    if kind == "save_to_disk":
        ds.save_to_disk(str(folder))
    else:
        folder.mkdir()
        ds.to_parquet(str(folder / "train.parquet"))
    train, held = prepare_image_text(ImageTextDataConfig(dataset=str(folder), validation_fraction=0.0))
    assert "dropping 1 of 4 row(s) without a caption" in capsys.readouterr().out
    assert held is None and len(train) == 3 and train.classnames == ["warm", "leafy", "cool"]
    assert list(train["path"]) == ["ds[0]", "ds[1]", "ds[3]"] and list(train["label"]) == [0, 1, 0]
    assert train[0]["captions"] == ["red", "crimson"] and isinstance(train[0]["bytes"], bytes)
    batch = _collator(tokenizer)(rows(train, [0, 1, 2]), _g())
    assert batch["images"][:, :, 0, 0].tolist() == [[255, 0, 0], [0, 128, 0], [255, 255, 255]]
    assert batch["labels"].tolist() == [0, 1, 0]


def test_dataset_with_image_paths_and_string_labels(tmp_path: Path) -> None:
    import datasets

    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(_png(_noise(8, i)))
    ds = datasets.Dataset.from_dict({"img": [f"{i}.png" for i in range(4)], "text": ["w", "x", "y", "z"],
                                     "kind": ["b", "a", "b", None]})
    ds.save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "ds" / "0.png").write_bytes((tmp_path / "0.png").read_bytes())  # relative to the dataset folder
    with pytest.raises(DataError, match=r"row 2: no such image file: .*1\.png"):
        prepare_image_text(ImageTextDataConfig(dataset=str(tmp_path / "ds"), image_column="img", label_column="kind"))
    for i in range(1, 4):
        (tmp_path / "ds" / f"{i}.png").write_bytes((tmp_path / f"{i}.png").read_bytes())
    train, held = prepare_image_text(ImageTextDataConfig(dataset=str(tmp_path / "ds"), image_column="img",
                                                         label_column="kind"))
    both = sorted(zip([*train["path"], *held["path"]], [*train["label"], *held["label"]]))
    assert len(train) >= 1 and len(held) >= 1 and train.classnames == ["a", "b"]
    assert [lab for _, lab in both] == [1, 0, 1, -1] and all(Path(p).is_file() for p, _ in both)


def test_streaming_matches_the_loaded_split(shapes: Path, tokenizer) -> None:
    cfg = ImageTextDataConfig(files=[str(shapes)], streaming=True)
    train, held = prepare_image_text(cfg)
    assert isinstance(train, ImageTextStream) and not hasattr(train, "__len__")
    assert train.classnames is None  # string labels are not numbered while streaming (no pass over the data)
    first = next(iter(train))
    assert set(first) == {"path", "bytes", "captions", "label"} and len(first["captions"]) == 4
    loaded_train, loaded_held = prepare_image_text(ImageTextDataConfig(files=[str(shapes)]))
    assert sorted(r["path"] for r in held) == sorted(loaded_held["path"])
    assert sum(1 for _ in train) == len(loaded_train)
    loader, stream = make_loader(train, 5, _collator(tokenizer, open_clip.image_transform(16, is_train=True)),
                                 seed=0, shuffle=True, drop_last=True, rank=0, world_size=1, split_tag=0)
    batch = next(iter(loader))
    assert batch["images"].shape == (5, 3, 16, 16) and batch["labels"].tolist() == [-1] * 5


def test_streaming_dataset_keeps_classlabel_names(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": _png(_noise(8, i)), "path": f"{i}.png"} for i in range(10)], "text": [f"n{i}" for i in range(10)],
         "label": [i % 2 for i in range(10)]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=["even", "odd"])}),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    train, held = prepare_image_text(ImageTextDataConfig(dataset=str(tmp_path / "ds"), streaming=True, validation_fraction=0.3))
    got = list(train) + list(held)
    assert train.classnames == ["even", "odd"] and len(got) == 10
    assert all(isinstance(r["bytes"], bytes) for r in got) and 0 < len(list(held)) < 10
    assert sorted((r["path"], r["label"], *r["captions"]) for r in got) == \
        sorted((f"ds[{i}]:{i}.png", i % 2, f"n{i}") for i in range(10))


# ------------------------------------------------------------------------------- errors in tables and configs
def test_missing_columns_name_the_config_key(tmp_path: Path, shapes: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("filepath,caption\nx.png,hello\n")
    with pytest.raises(DataError, match=r"no column 'title' \(columns: filepath, caption\); set data.caption_key"):
        prepare_image_text(ImageTextDataConfig(csv=str(table)))
    with pytest.raises(DataError, match=r"no column 'file'.*set data.image_key"):
        prepare_image_text(ImageTextDataConfig(csv=str(table), image_key="file", caption_key="caption"))
    with pytest.raises(DataError, match=r"no column 'species'.*set data.label_column"):
        prepare_image_text(ImageTextDataConfig(files=[str(shapes)], label_column="species"))
    with pytest.raises(DataError, match="has no metadata.jsonl or metadata.csv"):
        prepare_image_text(ImageTextDataConfig(files=[str(tmp_path)]))


def test_missing_image_file_names_row_and_path(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png(_noise(8)))
    table = tmp_path / "t.csv"
    table.write_text("filepath,title\na.png,one\ngone.png,two\n")
    with pytest.raises(DataError, match=r"t.csv: row 2: no such image file: .*gone.png"):
        prepare_image_text(ImageTextDataConfig(csv=str(table)))


def test_rows_without_captions_are_dropped_with_one_warning(tmp_path: Path, capsys) -> None:
    images = {f"{i}.png": _png(_noise(8, i)) for i in range(8)}
    caps: dict[str, object] = {"0.png": "", "1.png": "   ", "2.png": [], "3.png": None, "4.png": ["", "ok"]}
    train, held = prepare_image_text(ImageTextDataConfig(files=[str(_write_folder(tmp_path / "f", images, caps))]))
    out = capsys.readouterr().out
    assert len(train) + len(held) == 4 and out.count("warning:") == 1
    assert "dropping 4 of 8 row(s) without a caption" in out and "row 1 (" in out and out.rstrip().endswith("...")
    assert ["ok"] in [*train["captions"], *held["captions"]]


def test_split_and_config_edge_cases(tmp_path: Path) -> None:
    two = _write_folder(tmp_path / "two", {"a.png": _png(_noise(8, 1)), "b.png": _png(_noise(8, 2))})
    train, held = prepare_image_text(ImageTextDataConfig(files=[str(two)], validation_fraction=0.01))
    assert len(train) == 1 and len(held) == 1  # tiny sets: both sides non-empty
    one = _write_folder(tmp_path / "one", {"a.png": _png(_noise(8, 1))})
    with pytest.raises(DataError, match="need at least 2"):
        prepare_image_text(ImageTextDataConfig(files=[str(one)]))
    with pytest.raises(ConfigError, match="at most one"):
        ImageTextDataConfig(files=["x"], csv="y.csv")
    with pytest.raises(ConfigError, match="validation_fraction"):
        ImageTextDataConfig(validation_fraction=1.0)


# ------------------------------------------------------------------------------- decoding
def _cmyk_red_jpeg() -> bytes:
    return _png(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)  # entry 0 black (transparent), entry 1 red
    img.paste(1, (8, 0, 16, 16))
    return _png(img, transparency=0)


def _rgba_half_transparent() -> bytes:
    img = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    img.paste((0, 0, 255, 255), (8, 0, 16, 16))
    return _png(img)


def _gray16() -> bytes:
    a = np.zeros((16, 16), dtype=np.uint16)
    a[:, 8:] = 65535
    a[:, 4:8] = 32896  # 128 * 257
    return _png(Image.fromarray(a))


CONVERTIBLE = {  # file -> (bytes, expected RGB of pixel (0, 0), of pixel (row 0, col 12))
    "rgb.png": (lambda: _png(Image.new("RGB", (16, 16), (10, 20, 30))), (10, 20, 30), (10, 20, 30)),
    "cmyk.jpg": (_cmyk_red_jpeg, (255, 0, 0), (255, 0, 0)),
    "palette.png": (_palette_with_transparency, (255, 255, 255), (200, 0, 0)),
    "rgba.png": (_rgba_half_transparent, (255, 255, 255), (0, 0, 255)),
    "la.png": (lambda: _png(Image.new("LA", (16, 16), (0, 0))), (255, 255, 255), (255, 255, 255)),
    "gray.png": (lambda: _png(Image.new("L", (16, 16), 128)), (128, 128, 128), (128, 128, 128)),
    "gray16.png": (_gray16, (0, 0, 0), (255, 255, 255)),
}


def _bad_files() -> dict[str, bytes]:
    png, jpeg = _png(_noise(16)), _png(_noise(16), "JPEG", quality=95)  # within the pixel limit: cut short
    return {
        "corrupt.png": bytes(np.random.default_rng(3).integers(0, 256, 500, dtype=np.uint8)),
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[:-200],
        "empty.png": b"",
        "notes.png": b"this is a text file, not a picture\n",
        "huge.png": _png(Image.new("RGB", (40, 40), "red")),  # above the test's max_image_pixels
    }


@pytest.mark.parametrize("name", sorted(CONVERTIBLE))
def test_modes_convert_to_sensible_rgb(name: str) -> None:
    make, at_0, at_12 = CONVERTIBLE[name]
    px = np.asarray(load_image(make(), name))
    assert px.shape == (16, 16, 3) and px.dtype == np.uint8
    assert np.abs(px[0, 0].astype(int) - at_0).max() <= 3, px[0, 0]
    assert np.abs(px[0, 12].astype(int) - at_12).max() <= 3, px[0, 12]
    if name == "gray16.png":
        assert tuple(px[0, 5]) == (128, 128, 128)


def test_bad_images_are_counted_named_and_skipped(tmp_path: Path, tokenizer, capsys) -> None:
    files = {**{k: v[0]() for k, v in CONVERTIBLE.items()}, **_bad_files()}
    folder = _write_folder(tmp_path / "mixed", files)
    data, _ = prepare_image_text(ImageTextDataConfig(files=[str(folder)], validation_fraction=0.0))
    collate = _collator(tokenizer, max_image_pixels=16 * 16)
    capsys.readouterr()
    batch = collate(rows(data, list(range(len(data)))), _g())
    out = capsys.readouterr().out.splitlines()
    assert batch["images"].shape == (len(files), 3, 16, 16)  # one row per sample; a bad image's holds zeros
    assert int(batch["valid"].sum()) == len(CONVERTIBLE)
    assert int(batch["skipped"]) == 6
    assert len(out) == 3 and out[0].startswith("warning: skipping bad image (1 so far in this worker): ")
    assert "(3 so far in this worker)" in out[2]
    one_bad = _collator(tokenizer, max_image_pixels=16 * 16)
    bad_row = next(i for i in range(len(data)) if not batch["valid"][i])
    for _ in range(3):  # the same bad file met in three epochs (or evaluations) of one worker
        assert int(one_bad(rows(data, [bad_row]), _g())["skipped"]) == 1
    again = capsys.readouterr().out.splitlines()
    assert len(again) == 1 and "(1 so far in this worker)" in again[0], "a file met again is named once"
    named = [name for name in _bad_files() if any(name in line for line in out)]
    assert len(named) == 3
    for line in out:
        assert str(folder) in line
    again = collate(rows(data, list(range(len(data)))), _g())
    assert int(again["skipped"]) == 6 and capsys.readouterr().out == ""
    # each kind of bad image gives a reason
    reasons = {}
    for name, blob in _bad_files().items():
        with pytest.raises(DataError) as info:
            load_image(blob, name, max_pixels=16 * 16)
        assert str(info.value).startswith(f"{name}: ")
        reasons[name] = str(info.value).removeprefix(f"{name}: ")
    assert reasons["empty.png"] == "empty file" and reasons["notes.png"].startswith("not an image")
    assert reasons["corrupt.png"].startswith("not an image")
    assert reasons["huge.png"] == "40x40 = 1600 pixels is above max_image_pixels=256"
    assert "truncated" in reasons["truncated.jpg"] and "truncated" in reasons["truncated.png"]


def test_pils_own_bomb_guard_is_respected_not_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match="decompression bomb"):
        load_image(_png(_noise(16)), "bomb.png", max_pixels=10**6)  # above twice PIL's limit: PIL refuses
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(_png(_noise(12)), "big.png", max_pixels=10**6).size == (12, 12)  # only PIL's warning
    assert Image.MAX_IMAGE_PIXELS == 100


def test_bad_image_with_error_policy_names_the_file(tmp_path: Path, tokenizer) -> None:
    folder = _write_folder(tmp_path / "f", {"good.png": _png(_noise(16)), "broken.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40})
    data, _ = prepare_image_text(ImageTextDataConfig(files=[str(folder)], validation_fraction=0.0))
    with pytest.raises(DataError, match=r"broken\.png"):
        _collator(tokenizer, on_bad_image="error")(rows(data, [0, 1]), _g())
    lone = _collator(tokenizer)([{"path": "ds[0]", "bytes": b"", "captions": ["x"]}], _g())
    assert lone["valid"].tolist() == [False] and int(lone["skipped"]) == 1  # a counted skip, not the end of the run


# ------------------------------------------------------------------------------- determinism
def test_batches_depend_on_the_batch_seed_alone(shapes: Path, tokenizer) -> None:
    data, _ = prepare_image_text(ImageTextDataConfig(files=[str(shapes)], validation_fraction=0.0))
    samples = rows(data, list(range(8)))
    collate = _collator(tokenizer, open_clip.image_transform(24, is_train=True))
    torch.manual_seed(1)
    random.seed(1)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    a = collate(samples, _g(5))
    assert torch.equal(before[0], torch.get_rng_state()) and before[1] == random.getstate()
    assert np.array_equal(before[2], np.random.get_state()[1])  # the global generators are untouched
    torch.manual_seed(2)
    random.seed(2)
    b = collate(samples, _g(5))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = collate(samples, _g(6))
    assert not torch.equal(a["images"], c["images"])  # other random crops
    texts = [collate(samples, _g(s))["texts"] for s in range(4)]
    assert any(not torch.equal(texts[0], t) for t in texts[1:])  # another caption picked somewhere
    first = _collator(tokenizer, open_clip.image_transform(24, is_train=False), sample_caption=False)(samples, _g(9))
    assert torch.equal(first["texts"], tokenizer([s["captions"][0] for s in samples]))


def test_batches_are_the_same_in_dataloader_workers(shapes: Path, tokenizer) -> None:
    data, _ = prepare_image_text(ImageTextDataConfig(files=[str(shapes)], validation_fraction=0.0))
    collate = _collator(tokenizer, open_clip.image_transform(24, is_train=True))

    def first_batches(workers: int) -> list[dict[str, torch.Tensor]]:
        loader, sampler = make_loader(data, 6, collate, seed=3, shuffle=True, drop_last=True, rank=0, world_size=1,
                                      split_tag=0, num_workers=workers)
        sampler.set_epoch(0)
        return [b for _, b in zip(range(3), loader)]

    main, workers = first_batches(0), first_batches(2)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(main, workers) for k in x)
