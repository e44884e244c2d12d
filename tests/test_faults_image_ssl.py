"""Bad images in the image-only families (joint-embedding SSL, MAE, image fine-tuning): a batch whose
images are all bad, in training or eval, ends no run and trains nothing (no weight, AdamW moment or
EMA teacher moves); each bad file counts once, across epochs and an exact resume; the probe leaves
out probe images that do not decode; and under two processes, one of which lost every image of its
batch, the losses, their gathers and a SimCLR run behave as one process over the good rows."""

from __future__ import annotations

import importlib
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from multissl.data.demo import is_heldout
from multissl.data.image_data import ImageDataConfig, prepare_images
from multissl.errors import DataError
from multissl.metrics import Mean, read_jsonl, scalar
from multissl.training.loader import ShardedBatchSampler
from multissl.training.skips import BadInputs
from tests import test_image_ssl, test_mae
from tests.conftest import BIN, run
from tests.dist_faults_image_ssl import SPLITS, kept, loss_of
from tests.dist_image_losses import HALF, KINDS, build, teacher_outputs

FRACTION = 0.01
"""data.validation_fraction: the held-out split is exactly the images whose names `is_heldout` picks."""
NOT_AN_IMAGE = b"\x89PNG\r\n\x1a\n not really a png"
STEPS = 16
"""Two epochs of the 8 training images in batches of one: each bad file is drawn twice."""


def _names(prefix: str, held: bool, count: int) -> list[str]:
    """``count`` file names that the held-out split takes (``held``) or leaves."""
    names = (f"{prefix}{k}.png" for k in range(100_000))
    return [n for n, _ in zip((n for n in names if is_heldout(n, FRACTION) == held), range(count))]


def _png(path: Path, seed: int, side: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = np.array([(200, 40, 40), (40, 60, 200)][seed % 2])
    pixels = np.random.default_rng(seed).normal(0, 40, (side, side, 3)) + colour
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def _corpus(root: Path, held_good: int = 0, held_bad: int = 1) -> tuple[Path, list[str], list[str]]:
    """Classes ``a`` and ``b``: 6 good and 2 bad training images; held out, ``held_good`` good and
    ``held_bad`` bad ones. Returns the folder, the bad training files and the held-out files."""
    good = _names("good", False, 6)
    bad = _names("bad", False, 2)
    held = _names("heldgood", True, held_good) + _names("heldbad", True, held_bad)
    for i, name in enumerate(good + _names("heldgood", True, held_good)):
        _png(root / "ab"[i % 2] / name, i)
    for i, name in enumerate(bad + _names("heldbad", True, held_bad)):
        path = root / "ab"[i % 2] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(NOT_AN_IMAGE if i % 2 else b"")  # undecodable, or an empty file
    train, eval_split = prepare_images(ImageDataConfig(files=[str(root)], validation_fraction=FRACTION))
    assert eval_split is not None and sorted(Path(p).name for p in eval_split.paths()) == sorted(held), \
        "precondition: the held-out split is the chosen files"
    assert len(train) == 8
    return root, bad, held


def _ssl_args(method: str, out: Path, folder: Path, steps: int = STEPS, **extra: Any) -> list[str]:
    run_args = {"data.files": f"[{folder}]", "data.validation_fraction": FRACTION, "trainer.batch_size": 1,
                "trainer.eval_every": 8, "trainer.save_every": 4, "trainer.log_every": 1, **extra}
    if method == "mae":
        return test_mae._args(out, steps, **run_args)
    return test_image_ssl._args(out, steps, method, **run_args)


def _main(method: str):  # noqa: ANN202 - a recipe's main
    return importlib.import_module(f"multissl_recipes.{method}").main


def _resume_exactly(main: Any, args: list[str], out: Path, steps: int) -> tuple[Any, list[dict[str, Any]]]:
    """A straight run, then the run again from the checkpoint before the last (the last and the model
    removed, as a kill right after that checkpoint leaves them): the weights and every logged loss (a
    step of only bad images logs none) must match. Returns the resumed result and the straight log."""
    straight = main(args)
    want = {k: v.clone() for k, v in straight.model.state_dict().items()}
    rows = read_jsonl(out / "metrics.jsonl")
    shutil.rmtree(out / "checkpoints" / f"step_{steps:08d}")
    shutil.rmtree(out / "model")
    resumed = main(args)
    assert resumed.state.step == steps
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6, msg=name)

    def losses(records: list[dict[str, Any]]) -> list[tuple[int, Any]]:
        picked = [(r["step"], r.get("train/loss", r.get("eval/loss", 0))) for r in records]
        return [(s, None if v is None else round(v, 5)) for s, v in picked]

    assert losses(read_jsonl(out / "metrics.jsonl")) == losses(rows)
    return resumed, rows


def _train_rows(out: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]


def _eval_rows(out: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]


def _assert_counted_once(out: Path, resumed: Any, bad: list[str], printed: str, held_bad: int = 1) -> None:
    """The two bad training files were drawn in 4 batches of their own (null loss, no gradient); with
    the bad held-out file (met at every evaluation, from step 0) they count 3, in the state, the log
    and the printed total of both runs."""
    total = len(bad) + held_bad
    train = _train_rows(out)
    empty = [r for r in train if r["train/loss"] is None]
    assert len(train) == STEPS and len(empty) == 2 * len(bad), "precondition: each bad file drawn in both epochs"
    assert any(r["step"] > STEPS - 4 for r in empty), "precondition: one is drawn after the checkpoint resumed from"
    assert all(r["train/grad_norm"] == 0 for r in empty)
    assert all(math.isfinite(r["train/loss"]) for r in train if r["train/loss"] is not None)
    assert resumed.state.seen["skipped_images"] == total and train[-1]["data/skipped_images"] == total
    assert printed.count(f"images: {total} skipped during training and evaluation") == 2
    assert f"images: {2 * len(bad)} skipped" not in printed and "non-finite" not in printed
    assert all(name in printed for name in bad), "each bad file is named"


# ------------------------------------------------------------------------------- image SSL and MAE
@pytest.mark.parametrize("method", ["simclr", "dino", "mae"])
def test_bad_images_alone_in_their_batches_end_no_run_and_count_once(method: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Batches of one image: each bad training file is a batch of no rows, the lone held-out image is
    bad (every evaluation scores nothing), and the run, resumed from a checkpoint, matches a straight one."""
    folder, bad, held = _corpus(tmp_path / "images")
    out = tmp_path / "run"
    resumed, _ = _resume_exactly(_main(method), _ssl_args(method, out, folder), out, STEPS)
    printed = capsys.readouterr().out
    _assert_counted_once(out, resumed, bad, printed)
    evals = _eval_rows(out)
    assert [r["step"] for r in evals] == [0, 8, 16]
    assert all(r["eval/loss"] is None for r in evals), "nothing held out could be scored"
    assert held[0] in printed
    assert (out / "model" / "README.md").is_file()
    if method == "mae":  # the reconstruction picture of held-out images: none could be drawn
        assert (out / "model" / "config.json").is_file() and not (out / "model" / "reconstructions.png").exists()


def test_a_step_of_only_bad_images_moves_no_weight_nor_adamw_state_nor_the_teacher(tmp_path: Path) -> None:
    """BYOL, a checkpoint after every step: across a step whose one image was bad, the weights, the
    AdamW state (moments and step count) and the EMA target are what they were; across the others they move."""
    folder, bad, _ = _corpus(tmp_path / "images")
    out = tmp_path / "run"
    _main("byol")(_ssl_args("byol", out, folder, 8, **{"trainer.save_every": 1, "trainer.keep_last": 10,
                                                     "trainer.eval_every": 0, "trainer.weight_decay": 0.1}))
    train = _train_rows(out)
    empty = [r["step"] for r in train if r["train/loss"] is None]
    assert len(empty) == len(bad) and all(s > 1 for s in empty), "precondition: the bad steps follow a checkpoint"

    def saved(step: int) -> dict[str, Any]:
        from safetensors.torch import load_file

        folder = out / "checkpoints" / f"step_{step:08d}"
        return {"model": load_file(folder / "model.safetensors"),
                "optimizer": torch.load(folder / "optimizer.bin", weights_only=False)["state"],
                "target": torch.load(folder / "custom_checkpoint_0.pkl", weights_only=False)["modules"]["target"]}

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    for step in range(2, 9):
        before, after = saved(step - 1), saved(step)
        unchanged = [same(before["model"], after["model"]), same(before["target"], after["target"]),
                     all(same(before["optimizer"][i], after["optimizer"][i]) for i in before["optimizer"])]
        assert unchanged == [step in empty] * 3, (step, unchanged)


def test_a_probe_image_that_does_not_decode_is_left_out_of_the_probe(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """probe.task=files, one of whose eval images is bad: the probe scores the others, counts it and
    names it once, at every evaluation."""
    folder, _, _ = _corpus(tmp_path / "images")
    a, b = (sorted((folder / c).glob("good*.png")) for c in "ab")  # 3 good images of each class
    broken = folder / "a" / "probe_broken.png"
    broken.write_bytes(NOT_AN_IMAGE)
    listing = lambda paths: "path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in paths)  # noqa: E731
    (tmp_path / "probe_train.csv").write_text(listing([*a[:2], *b[:2]]))
    (tmp_path / "probe_eval.csv").write_text(listing([a[2], b[2], broken]))
    out = tmp_path / "run"
    _main("simclr")(_ssl_args("simclr", out, folder, 2, **{
        "probe.task": "files", "probe.files": f"[{tmp_path / 'probe_train.csv'}]",
        "probe.eval_files": f"[{tmp_path / 'probe_eval.csv'}]", "probe.knn_k": 2, "probe.knn_extra_k": "[]",
        "trainer.eval_every": 2, "trainer.save_every": 0}))
    evals = _eval_rows(out)
    assert [r["step"] for r in evals] == [0, 2]
    for record in evals:
        assert record["probe/skipped_images"] == 1 and 0 <= record["probe/linear_acc"] <= 1
        assert 0 <= record["probe/knn_acc"] <= 1 and record["probe/chance"] == 0.5  # one eval image a class
    printed = capsys.readouterr().out
    assert printed.count("probe.files: 1 image(s) could not be used") == 1 and str(broken) in printed


def test_an_empty_batch_gives_every_method_finite_zero_outputs_and_full_zero_gradients(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each method's compute on a batch of no images (its collator's output for one bad file): every
    output counts nothing and is finite, every parameter gets a zero gradient (DDP needs all of
    them), and no buffer (batch-norm statistics) moves, in training and in eval."""
    for method in ["simclr", "moco", "byol", "simsiam", "barlow_twins", "vicreg", "dino", "rotation", "mae"]:
        objective = _objective(method, monkeypatch)
        batch = objective.collator()([{"path": "/nowhere/missing.png", "bytes": None, "label": 0}], torch.Generator())
        assert int(batch["skipped"]) == 1 and batch["labels"].shape == (0,)
        model = objective.model
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for training in (True, False):
            model.train(training)
            out = objective.compute(model, batch)
            for name, value in out.items():
                assert isinstance(value, Mean) and float(value.count) == 0, (method, name)
                assert math.isfinite(float(value.total.detach())), (method, name)
            if training:
                scalar(out["loss"]).backward()
                grads = [p.grad for p in model.parameters() if p.requires_grad]
                assert all(g is not None and not g.any() for g in grads), method
                model.zero_grad(set_to_none=True)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), method


def _objective(method: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The objective a recipe's tiny test preset builds, without training it."""
    recipe = importlib.import_module(f"multissl_recipes.{method}")
    built: list[Any] = []

    def build(cfg: Any, make: Any) -> None:
        built.append(make(augment=cfg.augment, on_bad_image="skip", max_image_pixels=10**8, collapse=cfg.collapse))

    monkeypatch.setattr(recipe, "fit_image_ssl", build)
    out = Path("/nonexistent/never-written")
    recipe.main(test_mae._args(out, 1) if method == "mae" else test_image_ssl._args(out, 1, method))
    return built[0]


def test_methods_with_their_own_state_report_bad_images_by_id_and_keep_their_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer counts bad files once (its state holds the ids); the objectives report them by id
    in every batch, and a method's own resume state is its own."""
    batch = {"skipped": 2, "skipped_ids": torch.tensor([11, 12])}
    for method, own in (("moco", "shuffles"), ("dino", "step")):
        objective = _objective(method, monkeypatch)
        for _ in range(2):
            assert objective.count({**batch, "labels": torch.zeros(0)})["skipped_images"] == BadInputs((11, 12))
        setattr(objective, own, 7)
        fresh = _objective(method, monkeypatch)
        fresh.load_state_dict(objective.state_dict())
        assert getattr(fresh, own) == 7


# ------------------------------------------------------------------------------- image fine-tuning
def _finetune_args(out: Path, folder: Path, **extra: Any) -> list[str]:
    args = {"trainer.output_dir": out, "data.files": f"[{folder}]", "data.validation_fraction": FRACTION,
            "model.image_size": 16, "trainer.max_steps": STEPS, "trainer.batch_size": 1, "trainer.eval_batch_size": 1,
            "trainer.progress_bar": "false", "trainer.trackers": "[]", "trainer.log_every": 1, "trainer.eval_every": 8,
            "trainer.save_every": 4, "trainer.warmup_steps": 0, **extra}
    return [f"{k}={v}" for k, v in args.items()]


def test_finetuning_scores_the_good_held_out_images_and_counts_each_bad_file_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad held-out image alone in its eval batch is in no metric and no prediction; bad training
    images alone in their batches train nothing; each counts once, across a resume."""
    from multissl_recipes import finetune_image_classification as recipe

    folder, bad, held = _corpus(tmp_path / "images", held_good=2)
    out = tmp_path / "run"
    resumed, _ = _resume_exactly(recipe.main, _finetune_args(out, folder), out, STEPS)
    _assert_counted_once(out, resumed, bad, capsys.readouterr().out)
    evals = _eval_rows(out)
    assert [r["step"] for r in evals] == [0, 8, 16]
    assert all(r["eval/accuracy"] in (0.0, 0.5, 1.0) and math.isfinite(r["eval/loss"]) for r in evals), \
        "two good held-out images scored"
    predictions = read_jsonl(out / "predictions.jsonl")
    assert sorted(Path(p["path"]).name for p in predictions) == sorted(h for h in held if h.startswith("heldgood"))


def test_finetuning_with_no_usable_held_out_image_is_a_one_line_error(tmp_path: Path) -> None:
    from multissl_recipes import finetune_image_classification as recipe

    folder, _, held = _corpus(tmp_path / "images", held_good=0, held_bad=1)
    with pytest.raises(DataError) as info:
        recipe.main(_finetune_args(tmp_path / "run", folder))
    message = str(info.value)
    assert "no held-out image of this evaluation could be used" in message and "\n" not in message


# ------------------------------------------------------------------------------- two processes
def _dist_folder(root: Path) -> tuple[Path, list[str], int]:
    """8 training images for 2 processes in batches of one: at step 1 rank 1's image is bad, at step 2
    both are (no rows anywhere), steps 3 and 4 are good. Returns the folder, the bad files and the
    skip total of 8 steps (2 epochs): each bad file once, although the shuffle deals some of them to
    both processes."""
    for i in range(8):
        _png(root / "ab"[i % 2] / f"img{i}.png", i)
    train, _ = prepare_images(ImageDataConfig(files=[str(root)], validation_fraction=0.0))
    sampler = ShardedBatchSampler(len(train), 1, seed=0, shuffle=True, drop_last=True, split_tag=0, world_size=2)
    drawn = []  # (epoch, rank, row) in the order the processes meet them; global batch b is rank b % 2's
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        drawn += [(epoch, b % 2, batch[0]) for b, batch in enumerate(sampler.global_batches())]
    bad_rows = {drawn[b][2] for b in (1, 2, 3)}  # epoch 0: step 1 rank 1, step 2 both ranks
    for row in bad_rows:
        Path(train.paths()[row]).write_bytes(NOT_AN_IMAGE)
    met = [(e, r, row) for e, r, row in drawn if row in bad_rows]
    per_process = len({(r, row) for _, r, row in met})
    assert per_process > len(bad_rows), "precondition: a bad file is met by both processes"
    assert {row for e, _, row in met if e == 1} == bad_rows, "precondition: epoch 2 meets them all again"
    return root, [train.paths()[row] for row in sorted(bad_rows)], len(bad_rows)


def _torchrun(tmp_path: Path, args: list[str], *flags: str) -> Any:
    script = Path(__file__).with_name("dist_faults_image_ssl.py")
    # --standalone: a free rendezvous port; the timeout is the test that nothing hangs
    proc = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path), *flags,
                "--", *args], timeout=420, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_two_processes_with_bad_images_gather_uneven_rows_and_train_as_one_over_the_good(tmp_path: Path) -> None:
    folder, bad, total = _dist_folder(tmp_path / "images")
    out = tmp_path / "run"
    args = test_image_ssl._args(out, 8, "simclr", **{"data.files": f"[{folder}]", "data.validation_fraction": 0,
                                                     "trainer.batch_size": 1, "trainer.eval_every": 0,
                                                     "trainer.save_every": 4})
    proc = _torchrun(tmp_path, args, "--losses")
    ranks = [torch.load(tmp_path / f"losses_rank{r}.pt", weights_only=False) for r in (0, 1)]
    for split, valid in SPLITS.items():
        good = torch.tensor(valid)
        _assert_gather(split, ranks)
        for kind in KINDS:  # one process over the good rows: the loss and the gradient of each process
            model, x1, x2 = build()
            z1, z2 = model(torch.cat([x1[good], x2[good]])).chunk(2)
            want = loss_of(kind, z1, z2, None)
            want.backward()
            for got in (ranks[0][f"{split}/{kind}"], ranks[1][f"{split}/{kind}"]):
                assert got["local_loss_finite"]
                assert got["loss"] == pytest.approx(float(want.detach()), rel=1e-5), (split, kind)
                for name, p in model.named_parameters():
                    torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=f"{split} {kind}")
        center, teacher = teacher_outputs()
        from multissl.losses.dino import update_center

        for rank in ranks:
            torch.testing.assert_close(rank[f"{split}/center"], update_center(center, [t[good] for t in teacher], 0.9))
            assert rank[f"{split}/moco_keys"] < 1e-5, "shuffled keys come back to their own rows"
    # the SimCLR run: step 1 with no image on rank 1, step 2 with none anywhere (no step taken)
    straight = read_jsonl(out / "metrics.jsonl")
    train = [r for r in straight if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9)) and train[1]["train/loss"] is None
    assert train[1]["train/grad_norm"] == 0 and all(math.isfinite(r["train/loss"]) for r in train if r["step"] != 2)
    assert train[-1]["data/skipped_images"] == total and train[-1]["throughput/samples_per_s"] > 0
    assert f"images: {total} skipped during training" in proc.stdout and "non-finite" not in proc.stdout
    weights = (out / "model" / "model.safetensors").read_bytes()
    # resumed from step 4 (the epoch boundary): the files counted before are not counted again
    shutil.rmtree(out / "checkpoints" / f"step_{8:08d}")
    shutil.rmtree(out / "model")
    resumed = _torchrun(tmp_path, args)
    assert "resuming from" in resumed.stdout and f"images: {total} skipped during training" in resumed.stdout
    again = read_jsonl(out / "metrics.jsonl")
    assert [(r["step"], r.get("train/loss"), r.get("data/skipped_images")) for r in again] == \
        [(r["step"], r.get("train/loss"), r.get("data/skipped_images")) for r in straight]
    assert (out / "model" / "model.safetensors").read_bytes() == weights, "the resumed run ends where the straight one did"


def _assert_gather(split: str, ranks: list[dict[str, Any]]) -> None:
    """Uneven parts come back whole, in rank order; each process's gradient is that of its own rows
    (every process computed the same weighted sum: twice the weights)."""
    rows = [kept(split, r) for r in (0, 1)]
    whole = torch.arange(2 * HALF * 3, dtype=torch.float32).view(2 * HALF, 3)[torch.cat(rows)]
    for r, got in enumerate(g[f"{split}/gather"] for g in ranks):
        torch.testing.assert_close(got["value"], whole)
        start = len(rows[0]) if r == 1 else 0
        assert got["offset"] == start
        torch.testing.assert_close(got["grad"], 2 * got["weights"][start : start + len(rows[r])])
