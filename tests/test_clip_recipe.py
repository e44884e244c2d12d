"""The CLIP recipe end to end on the embedded shapes corpus: learning, export, resume, bad images."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from multissl_recipes import clip
from PIL import Image

from multissl import config
from multissl.data.shapes_demo import build_shapes_corpus
from multissl.metrics import read_jsonl
from tests.conftest import assert_resume_is_exact


def _args(out: Path, steps: int, **extra: object) -> list[str]:
    args = [f"trainer.output_dir={out}", f"trainer.max_steps={steps}", "trainer.progress_bar=false", "trainer.trackers=[]",
            "trainer.log_every=5"]
    return args + [f"{k}={v}" for k, v in extra.items()]


def test_tiny_preset_learns_and_exports(tmp_path: Path) -> None:
    """Zero-shot accuracy and retrieval recall rise far above chance; open_clip loads the output back."""
    result = clip.main(_args(tmp_path, 100, **{"trainer.eval_every": 100}))
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "eval/zero_shot_top1" in r]
    assert [r["step"] for r in evals] == [0, 100]
    before, after = evals
    chance = before["eval/zero_shot_chance"]
    assert chance == pytest.approx(1 / 36)
    assert before["eval/zero_shot_top1"] < 3 * chance
    assert after["eval/zero_shot_top1"] > 4 * chance, after
    for direction in ("image_to_text", "text_to_image"):
        assert after[f"eval/{direction}_R@1"] > 8 * after["eval/retrieval_chance"], after
        assert after[f"eval/{direction}_R@10"] > after[f"eval/{direction}_R@1"]
    assert after["eval/loss"] < before["eval/loss"] - 1.0

    import open_clip

    model_dir = tmp_path / "model"
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    image = preprocess(Image.new("RGB", (64, 64), (200, 30, 30))).unsqueeze(0)
    text = tokenizer(["a photo of a red circle", "a photo of a blue star"])
    trained = result.model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(image), trained.encode_image(image))
        torch.testing.assert_close(loaded.encode_text(text), trained.encode_text(text))
    card = (model_dir / "README.md").read_text()
    assert "library_name: open_clip" in card and "zero_shot_top1" in card and "transformers." not in card
    assert (model_dir / "loss_curve.png").is_file() and "](loss_curve.png)" in card
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    scope = {"pil_image": Image.new("RGB", (64, 64), (200, 30, 30))}
    exec(snippet, scope)  # the card's loading snippet runs as written
    assert scope["probs"].shape == (1, 2)


def test_resume_is_exact(tmp_path: Path) -> None:
    corpus = build_shapes_corpus(tmp_path / "shapes", 160, seed=1)
    args = _args(tmp_path / "run", 8, **{"trainer.save_every": 4, "trainer.keep_last": 3, "trainer.batch_size": 16,
                                          "data.files": f"[{corpus.parent}]", "trainer.eval_every": 4})
    assert_resume_is_exact(clip.main, args, tmp_path / "run", 8)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_bad_images_are_converted_or_skipped_and_the_run_completes(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    corpus = build_shapes_corpus(tmp_path / "shapes", 60, seed=2)
    folder = corpus.parent
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    good = (folder / rows[0]["file_name"]).read_bytes()
    extra = {
        "corrupt.png": good[:20] + b"\x00" * 200,
        "truncated.png": good[: len(good) // 2],
        "empty.png": b"",
        "notes.png": b"not an image at all\n",
        "huge.png": _png(Image.new("RGB", (400, 400), (10, 200, 10))),  # above data.max_image_pixels below
        "cmyk.jpg": None,
        "palette.png": _png(Image.new("P", (64, 64), 3)),
        "rgba.png": _png(Image.new("RGBA", (64, 64), (255, 0, 0, 0))),
        "gray.png": _png(Image.new("L", (64, 64), 128)),
        "nocaption.png": good,
    }
    for name, data in extra.items():
        path = folder / "images" / name
        if data is None:
            Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(path, format="JPEG")
        else:
            path.write_bytes(data)
        caption = "" if name == "nocaption.png" else f"a picture named {name}"
        rows.append({"file_name": f"images/{name}", "captions": [caption], "label": "red circle"})
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # every image lands in training (validation by name hash could hold some bad files out)
    args = _args(tmp_path / "run", 6, **{"trainer.batch_size": 32, "data.files": f"[{folder}]", "trainer.eval_every": 0,
                                          "data.validation_fraction": 0, "data.max_image_pixels": 100_000,
                                          "trainer.num_workers": 2, "trainer.log_every": 3})
    result = clip.main(args)
    assert result.state.step == 6
    printed = capsys.readouterr().out
    assert "nocaption.png" in printed, "the row without a caption is dropped with a warning naming it"
    logged = [r.get("data/skipped_images", 0) for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    # the undecodable files (5) counted once each, however often the batches of the 6 steps drew them
    from multissl.data.image_text import prepare_image_text
    from multissl.training.loader import ShardedBatchSampler

    cfg = config.load(clip.ClipConfig, args)
    train, _ = prepare_image_text(cfg.data, cfg.trainer.seed)
    bad = {i for i, p in enumerate(train.data["path"]) if Path(p).name in {"corrupt.png", "truncated.png", "empty.png",
                                                                             "notes.png", "huge.png"}}
    sampler = ShardedBatchSampler(len(train), 32, seed=cfg.trainer.seed, shuffle=True, drop_last=True, split_tag=0)
    drawn: list[set[int]] = []  # the bad images of each batch
    for epoch in range(3):  # 69 images with a caption, batch 32: 2 batches an epoch
        sampler.set_epoch(epoch)
        drawn += [{i for i, _ in b if i in bad} for b in sampler]
    distinct = [len(set().union(*drawn[:3])), len(set().union(*drawn))]
    assert len(bad) == 5 and logged == distinct and sum(map(len, drawn)) > distinct[-1], (logged, drawn)
    assert f"images: {distinct[-1]} skipped during training" in printed


def test_spawned_workers_see_the_same_batches(tmp_path: Path) -> None:
    """The image-text collator (transforms, tokenizer) pickles without the model and builds in a
    spawned worker the very batches the main process would."""
    losses = []
    for workers, method in ((0, ""), (1, "spawn")):
        out = tmp_path / f"w{workers}"
        clip.main(_args(out, 2, **{"trainer.log_every": 1, "trainer.num_workers": workers,
                                   "trainer.worker_start_method": method, "trainer.batch_size": 16,
                                   "trainer.eval_max_batches": 1, "eval.max_images": 16}))
        losses.append([r["train/loss"] for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r])
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-6)
