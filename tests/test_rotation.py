"""Rotation prediction: the four-way loss against a slow per-image reference, and the recipe end to
end on the embedded digits (exports a timm backbone timm loads with the same features, learns to
tell rotations apart on held-out digits, resumes exactly, runs from the command line)."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from multissl import config
from multissl.metrics import Mean, read_jsonl
from multissl.objectives.joint_embedding import JointEmbeddingModel
from multissl.objectives.rotation import Rotation, rotate_four_ways, rotation_loss

SMALL = {"augment.size": 16, "model.backbone.kwargs": "{layers: [1, 1, 1, 1], channels: [8, 16, 16, 32]}"}
"""Smaller than the tiny preset: 16 px, a ResNet of 8-32 channels."""


def _recipe():  # noqa: ANN202 - a module
    return importlib.import_module("multissl_recipes.rotation")


def _args(out: Path, steps: int, small: bool = True, **extra: object) -> list[str]:
    args = {"trainer.output_dir": out, "trainer.max_steps": steps, "trainer.batch_size": 16, "trainer.log_every": 1,
            "trainer.progress_bar": "false", "trainer.trackers": "[]", "trainer.eval_max_batches": 1,
            "trainer.eval_batch_size": 16, "probe.task": '""', **(SMALL if small else {}), **extra}
    return [f"{k}={v}" for k, v in args.items()]


# --------------------------------------------------------------------------------- the loss
def _quarter_turn(image: torch.Tensor) -> torch.Tensor:
    """One 90-degree counter-clockwise turn of a (C, S, S) image, pixel by pixel:
    ``out[:, r, c] = image[:, c, S - 1 - r]``."""
    s = image.shape[-1]
    out = torch.empty_like(image)
    for r in range(s):
        for c in range(s):
            out[:, r, c] = image[:, c, s - 1 - r]
    return out


def _reference(model: JointEmbeddingModel, images: torch.Tensor) -> tuple[float, int, torch.Tensor]:
    """Each image at each of its 4 rotations through the model alone: mean of -log softmax[k] in
    Python floats, count of argmax == k, and the unrotated images' backbone features."""
    total, correct, features = 0.0, 0, []
    with torch.no_grad():
        for image in images:
            features.append(model.backbone(image[None])[0])
            rotated = image
            for k in range(4):
                logits = [float(v) for v in model(rotated[None])[1][0]]
                log_z = math.log(sum(math.exp(v) for v in logits))
                total += log_z - logits[k]
                correct += int(max(range(4), key=lambda j: logits[j]) == k)
                rotated = _quarter_turn(rotated)
    return total / (4 * len(images)), correct, torch.stack(features)


def _toy_model(channels: int, size: int) -> JointEmbeddingModel:
    """No batch norm: every image's logits depend on that image alone, as the reference assumes."""
    torch.manual_seed(channels * size)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, 6), nn.Tanh())
    return JointEmbeddingModel(backbone, nn.Linear(6, 4))


@pytest.mark.parametrize(("n", "channels", "size"), [(1, 1, 3), (3, 3, 4), (5, 2, 7)])
def test_rotation_loss_matches_the_reference(n: int, channels: int, size: int) -> None:
    g = torch.Generator().manual_seed(n)
    images = torch.randn(n, channels, size, size, generator=g)
    rotated, labels = rotate_four_ways(images)
    assert rotated.shape == (4 * n, channels, size, size) and labels.tolist() == [k for k in range(4) for _ in range(n)]
    for i in range(n):
        turned = images[i]
        for k in range(4):
            assert torch.equal(rotated[k * n + i], turned), f"image {i} at label {k} is {k} quarter turns"
            turned = _quarter_turn(turned)
    model = _toy_model(channels, size)
    loss, correct, features = rotation_loss(model, images)
    want_loss, want_correct, want_features = _reference(model, images)
    assert float(loss.detach()) == pytest.approx(want_loss, rel=1e-5)
    assert int(correct) == want_correct
    torch.testing.assert_close(features, want_features)


def test_rotation_loss_refuses_non_square_images() -> None:
    with pytest.raises(ValueError, match="square"):
        rotate_four_ways(torch.zeros(2, 3, 4, 5))


def test_the_objective_scores_one_view_with_its_timm_backbone(tmp_path: Path) -> None:
    """One transform (one view) a batch; in eval mode (batch norms on running statistics) the
    objective's loss and accuracy are the per-image reference's, and collapse metrics come along."""
    cfg = config.load(_recipe().RotationConfig, _args(tmp_path, 1), _recipe().DEFAULT_CONFIG)
    objective = Rotation(cfg.model, augment=cfg.augment)
    assert len(objective.view_transforms()) == 1 and objective.model_card().method == "rotation"
    assert isinstance(objective.model.projector[-1], nn.Linear) and objective.model.projector[-1].out_features == 4
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = objective.model.eval()
    with torch.no_grad():
        out = objective.compute(model, {"views": [images], "labels": torch.zeros(3, dtype=torch.long)})
    want_loss, want_correct, _ = _reference(model, images)
    assert float(out["loss"].value) == pytest.approx(want_loss, rel=1e-5)
    accuracy = out["rotation_accuracy"]
    assert isinstance(accuracy, Mean) and float(accuracy.value) == pytest.approx(want_correct / 12)
    assert {"embedding_std", "effective_rank"} <= set(out)


# --------------------------------------------------------------------------------- the recipe
def test_rotation_trains_and_exports_a_timm_backbone_with_the_objectives_features(tmp_path: Path) -> None:
    import timm
    from PIL import Image

    out = tmp_path / "run"
    args = _args(out, 3, small=False, **{"trainer.eval_every": 0})  # the tiny preset itself, 3 steps of 16
    result = _recipe().main(args)
    train = [r for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    assert len(train) == 3 and all(math.isfinite(r["train/loss"]) for r in train)
    assert {"train/rotation_accuracy", "train/embedding_std", "train/effective_rank"} <= set(train[-1])
    model = timm.create_model(f"local-dir:{out / 'model'}", pretrained=True).eval()
    assert model.num_classes == 0 and model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in result.model.parameters())
    # the objective rebuilt from the same config, holding the trained backbone, against timm alone
    cfg = config.load(_recipe().RotationConfig, args, _recipe().DEFAULT_CONFIG)
    objective = Rotation(cfg.model, augment=cfg.augment)
    objective.model.backbone.load_state_dict(result.model.state_dict())
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(28, 28, generator=g) * 255).byte().numpy()) for _ in range(4)]
    ours = objective.features(objective.model.eval(), images)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        theirs = model(torch.stack([transform(im.convert("RGB")) for im in images]))
    torch.testing.assert_close(theirs, ours)
    card = (out / "model" / "README.md").read_text()
    assert "library_name: timm" in card and "rotation" in card


def test_rotation_learns_to_tell_rotations_apart_on_held_out_digits(tmp_path: Path) -> None:
    """60 steps of 32 digits (x4 rotations) of the tiny preset, seed 0. Measured on 256 held-out
    digits (1,024 rotated images): rotation accuracy 0.583 (chance 0.25), eval loss 1.408 -> 0.832,
    in ~25 s on one core (the same numbers on every run: seeded)."""
    out = tmp_path / "run"
    _recipe().main(_args(out, 60, small=False, **{"trainer.batch_size": 32, "trainer.eval_batch_size": 64,
                                                  "trainer.eval_max_batches": 4, "trainer.log_every": 10}))
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval/rotation_accuracy" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval/rotation_accuracy"] < 0.35, "at init it is near chance"
    assert evals[-1]["step"] == 60 and evals[-1]["eval/rotation_accuracy"] > 0.45
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.3


def test_rotation_resume_is_exact(tmp_path: Path) -> None:
    from tests.conftest import assert_resume_is_exact

    out = tmp_path / "run"
    assert_resume_is_exact(_recipe().main, _args(out, 4, **{"trainer.save_every": 2, "trainer.eval_every": 0}), out, 4)


def test_base_config_is_the_papers_sgd() -> None:
    recipe = _recipe()
    cfg = config.build(recipe.RotationConfig, recipe.DEFAULT_CONFIG.parent / "base.yaml")
    t, a = cfg.trainer, cfg.augment
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.batch_size) == ("sgd", 0.1, 0.9, 5e-4, 128)
    assert (cfg.model.backbone.name, a.size, a.flip, a.jitter, a.grayscale) == ("resnet50", 224, 0.5, 0.0, 0.0)


def test_multissl_pretrain_rotation_with_an_override(tmp_path: Path) -> None:
    import yaml

    from tests.conftest import BIN, run

    out = tmp_path / "cli"
    proc = run([str(BIN / "multissl"), "pretrain", "rotation", *_args(out, 2, **{"model.head.hidden": "[16]"})],
               OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"]["head"]["hidden"] == [16] and resolved["trainer"]["max_steps"] == 2
    assert (out / "model" / "model.safetensors").is_file()
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r] == [1, 2]
