"""Bad image inputs, fault by fault: each one loads, converts, is a counted skip, or is a one-line
error; a batch whose images are all bad ends no run (CLIP training and eval, two processes); skip
totals count each bad file once; metadata may mix caption columns; a broken metadata line is named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from multissl_recipes import clip

from multissl.data.demo import is_heldout
from multissl.data.image_text import ImageTextCollator, ImageTextDataConfig, prepare_image_text
from multissl.data.images import decode_and_transform
from multissl.data.shapes_demo import build_shapes_corpus
from multissl.data.views import AugmentConfig, ViewsCollator, view_transform
from multissl.errors import DataError
from multissl.metrics import read_jsonl
from multissl.objectives.clip import MaskedContrastiveLoss
from multissl.training.loader import ShardedBatchSampler, rows
from multissl.training.skips import BadInputs, DistinctTally, skip_id
from tests import test_image_text_data
from tests.conftest import BIN, assert_resume_is_exact, run
from tests.dist_clip_grads import build_objective, grads, half
from tests.test_clip_recipe import _args
from tests.test_image_text_data import CONVERTIBLE, _bad_files, _noise, _png, _to_tensor, _write_folder

tokenizer = test_image_text_data.tokenizer  # the shared fixture, where pytest looks for it

BAD = sorted(_bad_files())
LIMIT = 16 * 16  # max_image_pixels that makes huge.png (40 x 40) bad


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pair(tmp_path: Path, name: str, blob: bytes) -> list[dict]:
    """Rows of a good image and ``name``, as a table source gives them."""
    (tmp_path / "good.png").write_bytes(_png(_noise(16)))
    (tmp_path / name).write_bytes(blob)
    return [{"path": str(tmp_path / n), "bytes": None, "captions": [f"a picture called {n}"], "label": i}
            for i, n in enumerate(("good.png", name))]


# ------------------------------------------------------------------------------- each bad kind, each collator
@pytest.mark.parametrize("name", BAD)
def test_each_bad_kind_is_a_counted_skip_in_every_image_collator(name: str, tmp_path: Path, tokenizer,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    samples = _pair(tmp_path, name, _bad_files()[name])
    bad_id = skip_id(samples[1]["path"])
    text = ImageTextCollator(_to_tensor, tokenizer, max_image_pixels=LIMIT)(samples, _g())
    assert text["valid"].tolist() == [True, False] and int(text["skipped"]) == 1
    assert text["skipped_ids"].tolist() == [bad_id] and text["labels"].tolist() == [0, -1]
    assert text["images"].shape == (2, 3, 16, 16) and not text["images"][1].any(), "a bad row holds zeros"
    views = ViewsCollator([_to_tensor, _to_tensor], max_image_pixels=LIMIT)(samples, _g())
    assert [v.shape[0] for v in views["views"]] == [1, 1] and views["skipped"] == 1
    assert views["skipped_ids"].tolist() == [bad_id] and views["labels"].tolist() == [0]
    kept, (pixels,), skipped = decode_and_transform(samples, [_to_tensor], _g(), max_pixels=LIMIT)  # MAE, fine-tuning
    assert [s["path"] for s in kept] == [samples[0]["path"]] and len(pixels) == 1 and skipped == 1
    printed = capsys.readouterr().out
    assert name in printed and "warning:" in printed
    for collate in (ImageTextCollator(_to_tensor, tokenizer, on_bad_image="error", max_image_pixels=LIMIT),
                    ViewsCollator([_to_tensor], on_bad_image="error", max_image_pixels=LIMIT)):
        with pytest.raises(DataError) as info:
            collate(samples, _g())
        assert name in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", sorted(CONVERTIBLE))
def test_each_image_mode_converts_to_rgb_in_every_image_collator(name: str, tmp_path: Path, tokenizer) -> None:
    make, at_0, at_12 = CONVERTIBLE[name]
    samples = _pair(tmp_path, name, make())
    text = ImageTextCollator(_to_tensor, tokenizer)(samples, _g())
    views = ViewsCollator([_to_tensor])(samples, _g())
    assert text["valid"].all() and int(text["skipped"]) == 0 and views["skipped"] == 0
    for image in (text["images"][1], views["views"][0][1]):
        assert image.shape == (3, 16, 16)
        assert np.abs(image[:, 0, 0].numpy() - at_0).max() <= 3 and np.abs(image[:, 0, 12].numpy() - at_12).max() <= 3


def test_a_batch_of_bad_images_keeps_its_rows_and_each_file_counts_once(tmp_path: Path, tokenizer) -> None:
    files = _bad_files()
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
    samples = [{"path": str(tmp_path / n), "bytes": None, "captions": ["x"]} for n in BAD]
    batch = ImageTextCollator(_to_tensor, tokenizer, max_image_pixels=LIMIT)(samples, _g())
    assert not batch["valid"].any() and batch["images"].shape[0] == len(BAD) and int(batch["skipped"]) == len(BAD)
    assert batch["texts"].shape[0] == len(BAD)
    views = ViewsCollator([view_transform(AugmentConfig(size=16))], max_image_pixels=LIMIT, allow_empty=True)(samples, _g())
    assert views["views"][0].shape == (0, 3, 16, 16) and views["labels"].shape == (0,) and views["skipped"] == len(BAD)
    with pytest.raises(DataError, match="none of the 6 images"):  # for objectives that cannot score an empty batch
        ViewsCollator([_to_tensor], max_image_pixels=LIMIT)(samples, _g())
    tally = DistinctTally()
    counts = []
    for b in (batch, batch, views):
        tally.add("skipped_images", BadInputs.of(b))
        counts.append(tally.sync(lambda mine: [mine]).get("skipped_images", 0))
    assert counts == [len(BAD), 0, 0]
    again = DistinctTally(tally.state())
    again.add("skipped_images", BadInputs.of(batch))
    assert again.pending_count() == 0, "the counted files survive a resume"


# ------------------------------------------------------------------------------- the masked loss
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_masked_loss_is_open_clips_loss_on_the_usable_rows(kind: str) -> None:
    from open_clip.loss import ClipLoss, SigLipLoss

    g = torch.Generator().manual_seed(4)
    image = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1).requires_grad_()
    scale, bias = torch.tensor(7.5), (torch.tensor(-2.0) if kind == "siglip" else None)
    valid = torch.tensor([True, False, True, True, False, True])
    reference = SigLipLoss() if kind == "siglip" else ClipLoss()
    args = (scale, bias) if kind == "siglip" else (scale,)
    ours = MaskedContrastiveLoss(kind)
    torch.testing.assert_close(ours(image, text, scale, bias), reference(image, text, *args))
    got = ours(image, text, scale, bias, valid)
    torch.testing.assert_close(got, reference(image[valid], text[valid], *args))
    got.backward()
    assert image.grad[~valid].abs().max() == 0 and text.grad[~valid].abs().max() == 0
    assert image.grad[valid].abs().max() > 0
    image.grad = text.grad = None
    total, count = ours.sums(image, text, scale, bias, torch.zeros(6, dtype=torch.bool))
    assert float(total.detach()) == 0 and float(count) == 0
    (total / count.clamp_min(1e-12)).backward()  # what the trainer differentiates on one process
    assert torch.isfinite(image.grad).all() and image.grad.abs().max() == 0


DIST_VALID = [True, False, True, True, False, False, False, False]
"""Rank 0 has one bad image of four; every image of rank 1 is bad."""
DIST_SCRIPT = f'''
import sys, tempfile, torch
from tests.dist_clip_grads import build_objective, grads, half
from multissl.training.trainer import Trainer, TrainerConfig

DIST_VALID = torch.tensor({DIST_VALID})

trainer = Trainer(TrainerConfig(output_dir=tempfile.mkdtemp(), trackers=[], progress_bar=False))
acc = trainer.accelerator
results = {{}}
for kind in ("clip", "siglip"):
    objective, batch = build_objective(kind)
    model = acc.prepare(objective.model)
    out = objective.compute(model, half({{**batch, "valid": DIST_VALID}}, acc.process_index))
    loss = trainer._backward_loss(out["loss"])
    acc.backward(loss)
    results[kind] = {{"grads": grads(acc.unwrap_model(model)),
                     "loss": float(acc.reduce(loss.detach().reshape(1), reduction="mean"))}}
if acc.is_main_process:
    torch.save(results, sys.argv[1])
acc.wait_for_everyone()
from multissl.cli import leave_process_group
leave_process_group(0)  # as a recipe ends under torchrun: os._exit after flushing (gloo can abort on the way out)
'''


def test_two_processes_one_with_only_bad_images_train_as_one_process_on_the_good_rows(tmp_path: Path) -> None:
    script = tmp_path / "dist_bad_rank.py"
    script.write_text(DIST_SCRIPT)
    # --standalone: a free rendezvous port, so a torchrun of another test at the same time cannot collide
    proc = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "g.pt")],
               timeout=600, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "g.pt")
    valid = torch.tensor(DIST_VALID)
    for kind in ("clip", "siglip"):
        objective, batch = build_objective(kind)
        objective.model.train()
        out = objective.compute(objective.model, {**batch, "valid": valid})
        out["loss"].value.backward()
        want = grads(objective.model)
        assert got[kind]["loss"] == pytest.approx(float(out["loss"].value.detach()), rel=1e-5)
        for name, value in want.items():
            torch.testing.assert_close(got[kind]["grads"][name], value, rtol=1e-4, atol=1e-6, msg=f"{kind} {name}")
        # rank 1's rows are neither anchors nor negatives: the loss is that of rank 0's good rows alone
        alone = objective.compute(objective.model, half({**batch, "valid": valid}, 0))["loss"].value.detach()
        assert float(alone) == pytest.approx(float(out["loss"].value.detach()), rel=1e-5)


# ------------------------------------------------------------------------------- CLIP runs
def _corpus(tmp_path: Path, n: int, bad: dict[str, bytes], seed: int = 3) -> Path:
    """The shapes corpus with ``bad`` images added to its metadata (captioned like any other)."""
    meta = build_shapes_corpus(tmp_path / "corpus", n, seed=seed)
    lines = meta.read_text().splitlines()
    for name, blob in bad.items():
        (meta.parent / "images" / name).write_bytes(blob)
        lines.append(json.dumps({"file_name": f"images/{name}", "captions": [f"a picture called {name}"],
                                 "label": "red circle"}))
    meta.write_text("".join(line + "\n" for line in lines))
    return meta.parent


def test_the_lone_held_out_image_being_bad_ends_no_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fraction = 0.005
    name = next(f"bad{k}.png" for k in range(10_000) if is_heldout(f"bad{k}.png", fraction))
    folder = _corpus(tmp_path, 24, {name: b"\x89PNG\r\n\x1a\n not really a png"})
    _, held = prepare_image_text(ImageTextDataConfig(files=[str(folder)], validation_fraction=fraction))
    assert [Path(p).name for p in held["path"]] == [name], "precondition: the bad image is all the held-out set"
    out = tmp_path / "run"
    result = clip.main(_args(out, 2, **{"trainer.batch_size": 8, "trainer.eval_every": 2, "data.files": f"[{folder}]",
                                        "data.validation_fraction": fraction}))
    assert result.state.step == 2 and (out / "model" / "open_clip_config.json").is_file()
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [0, 2]
    for record in evals:
        assert record["eval/skipped_images"] == 1 and record["eval/loss"] is None, record  # nothing left to score
        assert "eval/image_to_text_R@1" not in record
    assert result.state.seen["skipped_images"] == 1, "in the run's total once, however many evaluations met it"
    printed = capsys.readouterr().out
    assert name in printed and "images: 1 skipped during training and evaluation" in printed


def test_batches_of_only_bad_images_train_on_and_count_each_file_once(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Batches of one image: every bad one is a batch with no usable row; the run completes without a
    non-finite step, and the total is the number of bad files."""
    files = _bad_files()
    folder = _corpus(tmp_path, 6, {n: files[n] for n in ("empty.png", "notes.png", "truncated.png")})
    out = tmp_path / "run"
    result = clip.main(_args(out, 9, **{"trainer.batch_size": 1, "data.files": f"[{folder}]", "trainer.eval_every": 0,
                                        "data.validation_fraction": 0, "trainer.log_every": 9}))
    printed = capsys.readouterr().out
    assert result.state.step == 9 and "non-finite" not in printed
    assert result.state.seen["skipped_images"] == 3 and result.state.seen["samples"] == 6
    assert "images: 3 skipped during training" in printed


def test_a_bad_image_drawn_every_epoch_counts_once_also_after_a_resume(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    files = _bad_files()
    bad = {n: files[n] for n in ("corrupt.png", "truncated.jpg")}
    folder = _corpus(tmp_path, 14, bad)
    out = tmp_path / "run"
    args = _args(out, 9, **{"trainer.batch_size": 4, "data.files": f"[{folder}]", "trainer.eval_every": 0,
                            "data.validation_fraction": 0, "trainer.save_every": 3, "trainer.log_every": 3})
    train, _ = prepare_image_text(ImageTextDataConfig(files=[str(folder)], validation_fraction=0))
    bad_rows = {i for i, p in enumerate(train.data["path"]) if Path(p).name in bad}
    sampler = ShardedBatchSampler(len(train), 4, seed=0, shuffle=True, drop_last=True, split_tag=0)
    drawn = []
    for epoch in range(3):  # 16 images, 4 batches of 4 an epoch: the 9 steps take 2 epochs and a batch
        sampler.set_epoch(epoch)
        drawn += [sum(i in bad_rows for i, _ in batch) for batch in sampler]
    assert sum(drawn[:9]) > len(bad), "precondition: the bad files are drawn more than once each"
    resumed = assert_resume_is_exact(clip.main, args, out, 9)
    assert resumed.state.seen["skipped_images"] == len(bad)
    assert [r["data/skipped_images"] for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r][-1] == len(bad)
    assert capsys.readouterr().out.count(f"images: {len(bad)} skipped during training") == 2


# ------------------------------------------------------------------------------- metadata
def test_metadata_rows_may_name_their_caption_column_differently(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    rows_in = [{"file_name": "0.png", "caption": "a red one"}, {"file_name": "1.png", "text": "a blue one"},
               {"file_name": "2.png", "captions": ["a green one", "green"]}, {"file_name": "3.png", "title": "a grey one"},
               {"file_name": "4.png", "caption": "", "text": "an empty caption, then a text"},
               {"file_name": "5.png", "label": "none at all"}]
    for i, row in enumerate(rows_in):
        (folder / row["file_name"]).write_bytes(_png(_noise(8, i)))
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_in))
    want = {"0.png": ["a red one"], "1.png": ["a blue one"], "2.png": ["a green one", "green"], "3.png": ["a grey one"],
            "4.png": ["an empty caption, then a text"]}
    cfg = ImageTextDataConfig(files=[str(folder)], validation_fraction=0)
    loaded, _ = prepare_image_text(cfg)
    assert {Path(p).name: c for p, c in zip(loaded["path"], loaded["captions"])} == want
    printed = capsys.readouterr().out
    assert "dropping 1 of 6 row(s) without a caption" in printed and "metadata.jsonl: row 6 (5.png)" in printed
    streamed, _ = prepare_image_text(ImageTextDataConfig(files=[str(folder)], validation_fraction=0, streaming=True))
    assert {Path(r["path"]).name: r["captions"] for r in streamed} == want


@pytest.mark.parametrize("streaming", [False, True])
def test_a_broken_metadata_line_is_named_by_file_and_line(tmp_path: Path, streaming: bool) -> None:
    images = {f"{i}.png": _png(_noise(8, i)) for i in range(4)}
    folder = _write_folder(tmp_path / "f", images)
    meta = folder / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    lines[2] = lines[2].rstrip("}")  # line 3 loses its closing brace
    meta.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(DataError) as info:
        train, held = prepare_image_text(ImageTextDataConfig(files=[str(folder)], streaming=streaming))
        list(train)
    message = str(info.value)
    assert str(meta) in message and "line 3" in message and "\n" not in message
    assert "An error occurred while generating the dataset" not in message


def test_rows_of_one_collator_call_match_their_table(tmp_path: Path, tokenizer) -> None:
    """Mixed good and bad rows keep their positions: captions and labels stay with their image."""
    files = {**{k: v[0]() for k, v in CONVERTIBLE.items()}, **_bad_files()}
    folder = _write_folder(tmp_path / "mixed", files)
    data, _ = prepare_image_text(ImageTextDataConfig(files=[str(folder)], validation_fraction=0.0))
    samples = rows(data, list(range(len(data))))
    batch = ImageTextCollator(_to_tensor, tokenizer, max_image_pixels=LIMIT, sample_caption=False)(samples, _g())
    usable = [Path(s["path"]).name in CONVERTIBLE for s in samples]
    assert batch["valid"].tolist() == usable and int(batch["skipped"]) == len(BAD)
    want = tokenizer([s["captions"][0] if ok else "" for s, ok in zip(samples, usable)])
    assert torch.equal(batch["texts"], want)
