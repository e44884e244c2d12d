"""The image-classification task on tiny colour-class folders: start points, linear evaluation, the timm
(and transformers) export, stratified label fractions, bad images, resume, the lift report."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from multissl_recipes import finetune_image_classification as recipe
from PIL import Image

from multissl import config
from multissl.data.demo import is_heldout
from multissl.data.images import BadImage
from multissl.data.labels import LabelMap
from multissl.errors import ConfigError, DataError
from multissl.metrics import read_jsonl
from multissl.models.backbones import TINY, BackboneConfig, build_backbone, save_backbone, set_preprocessing
from multissl.objectives.image_classification import (
    ClassifierAugmentConfig,
    ImageClassification,
    ImageClassifierModelConfig,
    LabelledImageDataConfig,
    build_image_classifier,
    label_splits,
)
from multissl.training.loader import rows
from multissl.training.skips import BadInputs, skip_id
from tests.conftest import ROOT, assert_resume_is_exact

CLASSES = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}
PER_CLASS = 10
SIDE = 16
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
VALIDATION = 0.25
BROKEN = next(f"broken{i}.png" for i in range(100) if not is_heldout(f"broken{i}.png", VALIDATION))
"""A corrupt file whose name puts it in the training split."""


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of noisy colour squares (``<class>/<class>_<i>.png``) and one corrupt training file."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for name, colour in CLASSES.items():
        (root / name).mkdir()
        for i in range(PER_CLASS):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")
    (root / "red" / BROKEN).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def _data(images: Path, **extra: Any) -> LabelledImageDataConfig:
    return LabelledImageDataConfig(files=[str(images)], **{"validation_fraction": VALIDATION, **extra})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image-SSL run folder as the pretraining recipes write it: the tiny ResNet backbone at 16 px
    in timm's format under model/, with BatchNorm statistics that moved away from their defaults."""
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(kwargs=TINY))
    set_preprocessing(backbone, SIDE, MEAN, STD)
    with torch.no_grad():
        backbone.train()(torch.rand(8, 3, SIDE, SIDE) * 3 + 1)
    run = tmp_path_factory.mktemp("ssl-run")
    save_backbone(backbone.eval(), run / "model")
    (run / "config.yaml").write_text("trainer: {}\n")
    return run


def _saved(pretrained: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(pretrained / "model" / "model.safetensors")


def _args(out: Path, images: Path, steps: int, **extra: Any) -> list[str]:
    train, _, _ = label_splits(_data(images))
    args = [f"trainer.output_dir={out}", f"data.files=[{images}]", f"data.validation_fraction={VALIDATION}",
            f"trainer.max_steps={steps}", f"trainer.batch_size={len(train)}",  # every image, the broken one too
            "trainer.progress_bar=false", "trainer.trackers=[]", "trainer.log_every=1", "trainer.warmup_steps=0",
            "trainer.eval_every=0", "trainer.save_every=0", "trainer.lr=1e-2"]
    return args + [f"{k}={v}" for k, v in extra.items()]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, images: Path, pretrained: Path) -> tuple[Any, Path]:
    out = tmp_path_factory.mktemp("run")
    return recipe.main(_args(out, images, 6, **{"model.init_from": pretrained})), out


# --------------------------------------------------------------------------- start points
def test_start_points_keep_or_drop_the_pretrained_weights(pretrained: Path) -> None:
    labels = LabelMap(tuple(CLASSES))
    saved = _saved(pretrained)

    def build(**kw: Any) -> tuple[Any, str]:
        return build_image_classifier(ImageClassifierModelConfig(**kw), labels)

    for ref in (pretrained, pretrained / "model"):  # a run folder or its timm folder
        tuned, base = build(init_from=str(ref))
        assert base == str(pretrained / "model") and tuned.num_classes == 3
        state = tuned.state_dict()
        assert set(state) == set(saved) | {"fc.weight", "fc.bias"}
        for name, value in saved.items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    assert tuple(tuned.pretrained_cfg["input_size"]) == (3, SIDE, SIDE) and tuple(tuned.pretrained_cfg["mean"]) == MEAN
    assert tuned.pretrained_cfg["label_names"] == list(CLASSES)
    fresh, base = build(init_from=str(pretrained), random_init=True)
    assert base == "" and tuple(fresh.pretrained_cfg["input_size"]) == (3, SIDE, SIDE)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert not torch.allclose(fresh.conv1.weight, saved["conv1.weight"])
    resized, _ = build(init_from=str(pretrained), image_size=24)
    assert tuple(resized.pretrained_cfg["input_size"]) == (3, 24, 24) and tuple(resized.pretrained_cfg["mean"]) == MEAN
    scratch, base = build()
    assert base == "" and scratch.pretrained_cfg["input_size"] == (3, 32, 32)
    assert sum(p.numel() for p in scratch.parameters()) < 400_000, "the tiny ResNet"
    named, base = build(init_from="resnet18", kwargs=TINY)
    assert base == "" and named.pretrained_cfg["input_size"] == (3, 224, 224), "a timm name: its own preprocessing"


def test_init_from_that_is_not_a_timm_model_is_a_one_line_error(tmp_path: Path, images: Path) -> None:
    from transformers import BertConfig

    labels = LabelMap(tuple(CLASSES))
    text = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(text)
    (tmp_path / "empty").mkdir()
    cases = {str(tmp_path / "missing"): "no such run or model folder",
             str(text): "holds a transformers 'bert' model, not a timm image model",
             str(tmp_path / "empty"): "no model in",
             "resnet18x": "'resnet18x' is not a timm model; did you mean"}
    for ref, message in cases.items():
        with pytest.raises(ConfigError, match=message) as err:
            build_image_classifier(ImageClassifierModelConfig(init_from=ref), labels)
        assert "\n" not in str(err.value) and str(err.value).startswith("model.init_from=")
    with pytest.raises(ConfigError, match="not a timm image model"):
        recipe.main([f"trainer.output_dir={tmp_path / 'out'}", f"data.files=[{images}]", f"model.init_from={text}",
                     "trainer.trackers=[]"])


# ---------------------------------------------------------------------- linear evaluation
def test_linear_evaluation_trains_the_classifier_only(pretrained: Path, images: Path, tmp_path: Path) -> None:
    train, _, labels = label_splits(_data(images))
    cfg = ImageClassifierModelConfig(init_from=str(pretrained), freeze_backbone=True)
    net, _ = build_image_classifier(cfg, labels)
    objective = ImageClassification(net, labels, ClassifierAugmentConfig(), freeze_backbone=True)
    model = objective.model.train()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["net.fc.weight", "net.fc.bias"]
    assert model.training and net.fc.training and not net.training and not net.bn1.training
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.SGD(objective.param_groups(model)[0].params, lr=0.5)
    batch = objective.collator()(rows(train.data, list(range(len(train)))), torch.Generator().manual_seed(0))
    for _ in range(3):
        objective.compute(model, batch)["loss"].value.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = net.state_dict()
    assert not torch.allclose(after["fc.weight"], before["fc.weight"])
    for name in before:
        if not name.startswith("fc."):
            assert torch.equal(after[name], before[name]), name
    # through the trainer, with an evaluation in between (it calls train() again after it)
    result = recipe.main(_args(tmp_path, images, 4, **{"model.init_from": pretrained, "model.freeze_backbone": "true",
                                                       "trainer.eval_every": 2}))
    state = result.model.state_dict()
    for name, value in _saved(pretrained).items():
        assert torch.equal(state[name], value), f"{name} moved under linear evaluation"
    losses = [r["train/loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert losses[-1] < losses[0], "the classifier learns"


# ------------------------------------------------------------------------------- export
_LOAD_WITH_TIMM = """
import json, sys
import timm, torch
from PIL import Image
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
x = torch.stack([transform(Image.open(p).convert("RGB")) for p in sys.argv[2:]])
with torch.no_grad():
    logits = model(x)
assert not any(m.startswith("multissl") for m in sys.modules)
print(json.dumps({"logits": logits.tolist(), "pixels": x.tolist(), "labels": model.pretrained_cfg["label_names"]}))
"""


def test_exported_folder_is_the_classifier_timm_and_transformers_load(run: tuple[Any, Path]) -> None:
    """timm alone (another process, no multissl) rebuilds the classifier, its labels and its eval
    transform, with the trained model's logits; transformers' pipeline gives the same predictions."""
    from transformers import AutoModelForImageClassification, pipeline

    from multissl.models.backbones import eval_transform_of

    result, out = run
    preds = read_jsonl(out / "predictions.jsonl")
    paths = [p["path"] for p in preds[:5]]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _LOAD_WITH_TIMM, str(out / "model"), *paths], capture_output=True,
                          text=True, timeout=120, cwd=ROOT.parent, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["labels"] == list(CLASSES)
    model, transform = result.model.eval(), eval_transform_of(result.model)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    torch.testing.assert_close(torch.tensor(loaded["pixels"]), x, rtol=0, atol=0)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(torch.tensor(loaded["logits"]), logits, rtol=1e-5, atol=1e-6)
    hf = AutoModelForImageClassification.from_pretrained(out / "model").eval()
    assert hf.config.id2label == dict(enumerate(CLASSES))
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, logits, rtol=1e-5, atol=1e-6)
    classify = pipeline("image-classification", model=str(out / "model"))
    for p in preds[:5]:
        top = classify(Image.open(p["path"]), top_k=1)[0]
        assert top["label"] == p["prediction"] and top["score"] == pytest.approx(p["score"], abs=2e-3)
    card = (out / "model" / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "library_name: timm" in card
    assert f'timm.create_model("local-dir:{out / "model"}"' in card


def test_predictions_metrics_and_skipped_image(run: tuple[Any, Path], images: Path, pretrained: Path) -> None:
    """predictions.jsonl holds every eval image under its own label; the corrupt file was skipped at
    each of the 6 steps (every batch is the whole training split) and counted once; full fine-tuning
    moved the BatchNorm statistics that linear evaluation keeps."""
    result, out = run
    _, held, _ = label_splits(_data(images))
    preds = read_jsonl(out / "predictions.jsonl")
    assert sorted(p["path"] for p in preds) == sorted(held.paths())
    assert all(set(p) == {"path", "label", "prediction", "score"} for p in preds)
    assert all(Path(p["path"]).parent.name == p["label"] for p in preds), "labels stay with their files"
    assert np.mean([p["label"] == p["prediction"] for p in preds]) == pytest.approx(result.final_metrics["accuracy"])
    assert result.best_metric == "accuracy" and 0 <= result.final_metrics["macro_f1"] <= 1
    train_rows = [r for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    assert train_rows[-1]["data/skipped_images"] == 1
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
    assert not any(k.startswith("train/_") for k in train_rows[-1])
    saved = _saved(pretrained)
    assert not torch.allclose(result.model.state_dict()["bn1.running_mean"], saved["bn1.running_mean"])


# ---------------------------------------------------------------------------------- data
def test_label_fraction_is_a_stratified_subset(images: Path) -> None:
    train, held, labels = label_splits(_data(images))
    assert labels.names == tuple(CLASSES) and not set(train.paths()) & set(held.paths())
    full = Counter(train.labels())
    part, same_held, _ = label_splits(_data(images, label_fraction=0.5))
    assert Counter(part.labels()) == {c: math.ceil(0.5 * n) for c, n in full.items()}
    assert set(part.paths()) < set(train.paths()) and same_held.paths() == held.paths()
    other, _, _ = label_splits(_data(images, label_fraction=0.5, subset_seed=1))
    assert Counter(other.labels()) == Counter(part.labels()) and other.paths() != part.paths()


def test_images_without_labels_and_missing_eval_splits_are_errors(images: Path, tmp_path: Path) -> None:
    import shutil

    loose = tmp_path / "loose"
    shutil.copytree(images, loose)
    Image.new("RGB", (20, 20)).save(loose / "stray.png")
    with pytest.raises(DataError, match=rf"{loose}.*1 of \d+ images have no label \(the first: .*stray\.png\)"):
        label_splits(_data(loose))
    with pytest.raises(ConfigError, match="needs an eval split"):
        _data(images, validation_fraction=0.0)
    with pytest.raises(ConfigError, match="data.eval_split names a split of data.dataset"):
        _data(images, eval_split="test")


def test_dataset_with_class_labels_and_an_eval_split(tmp_path: Path) -> None:
    import datasets

    def split(n: int) -> datasets.Dataset:
        blobs = []
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (12, 12), (i * 20 % 255, 0, 0)).save(buf, format="PNG")
            blobs.append({"bytes": buf.getvalue(), "path": None})
        return datasets.Dataset.from_dict(
            {"image": blobs, "label": [i % 2 for i in range(n)]},
            features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}))

    datasets.DatasetDict({"train": split(8), "test": split(4)}).save_to_disk(tmp_path / "ds")
    train, held, labels = label_splits(LabelledImageDataConfig(dataset=str(tmp_path / "ds"), eval_split="test"))
    assert labels.names == ("cat", "dog") and (len(train), len(held)) == (8, 4)
    assert "split test" in held.source


def test_collator_skips_bad_images_and_keeps_labels_aligned(images: Path) -> None:
    train, _, labels = label_splits(_data(images))
    net, _ = build_image_classifier(ImageClassifierModelConfig(image_size=SIDE), labels)
    objective = ImageClassification(net, labels, ClassifierAugmentConfig())
    order = np.argsort(train.paths()).tolist()  # red/broken sits between other red files
    samples = rows(train.data, order)
    collate = objective.collator()
    assert len(pickle.dumps(collate)) < 20_000 and len(pickle.dumps(objective.eval_collator())) < 20_000, \
        "spawned DataLoader workers unpickle the collators"
    a, b = collate(samples, torch.Generator().manual_seed(1)), collate(samples, torch.Generator().manual_seed(1))
    assert a["skipped"] == 1 and a["pixel_values"].shape == (len(samples) - 1, 3, SIDE, SIDE)
    assert torch.equal(a["pixel_values"], b["pixel_values"]), "seeded from the batch generator"
    assert not torch.equal(a["pixel_values"], collate(samples, torch.Generator().manual_seed(2))["pixel_values"])
    assert all(Path(p).parent.name == labels.names[y] for p, y in zip(a["path"], a["labels"].tolist()))
    broken_id = BadInputs((skip_id(next(s["path"] for s in samples if s["path"].endswith(BROKEN))),))
    assert objective.count(a) == {"samples": len(samples) - 1, "skipped_images": broken_id}
    bad = [s for s in samples if s["path"].endswith(BROKEN)]
    empty = collate(bad, torch.Generator())  # a batch of only bad images has no rows: a counted skip
    assert empty["pixel_values"].shape == (0, 3, SIDE, SIDE) and empty["path"] == [] and empty["skipped"] == 1
    assert objective.count(empty) == {"samples": 0, "skipped_images": broken_id}, "the trainer counts it once"
    objective.on_bad_image = "error"
    with pytest.raises(BadImage, match=BROKEN):
        objective.collator()(samples, torch.Generator())


# ------------------------------------------------------------------------ resume, lift, config
def test_resume_is_exact(tmp_path: Path, images: Path, pretrained: Path) -> None:
    args = _args(tmp_path, images, 4, **{"model.init_from": pretrained, "trainer.save_every": 2,
                                         "model.kwargs": "{drop_rate: 0.2}"})
    assert_resume_is_exact(recipe.main, args, tmp_path, 4)


def test_lift_runs_both_arms(tmp_path: Path, images: Path, pretrained: Path) -> None:
    from multissl.cli import main as cli

    train, _, _ = label_splits(_data(images, label_fraction=0.5))
    out = tmp_path / "lift"
    rc = cli(["lift", "image-classification", "--pretrained", str(pretrained), "--fractions", "0.5", "--seeds", "0",
              "--output-dir", str(out), f"data.files=[{images}]", f"data.validation_fraction={VALIDATION}",
              "trainer.max_steps=2", f"trainer.batch_size={len(train)}", "trainer.progress_bar=false",
              "trainer.trackers=[]"])
    assert rc == 0
    report = json.loads((out / "lift.json").read_text())
    assert report["metric"] == "accuracy" and not report["lower_is_better"]
    assert sorted(r["arm"] for r in report["runs"]) == ["from scratch", "pretrained"]
    assert {r["train_size"] for r in report["runs"]} == {len(train)}
    for r in report["runs"]:
        assert (Path(r["output_dir"]) / "model" / "model.safetensors").is_file()
    assert "| 50% |" in (out / "lift.md").read_text()


def test_shipped_config_loads() -> None:
    cfg = config.load(recipe.ImageClassificationConfig, [], recipe.DEFAULT_CONFIG)
    assert cfg.trainer.max_steps > 0 and not cfg.model.init_from and not cfg.model.freeze_backbone
    assert cfg.augment.flip == 0.0 and cfg.data.validation_fraction > 0
    assert recipe.DEFAULT_CONFIG.read_text().startswith("# multissl finetune image-classification ")
