"""The image-classification task from a transformers ViT folder (what the MAE recipe exports): start
points, the folder transformers' pipeline runs (same labels and probabilities as our eval path), linear
evaluation, bad folders, learning on real digits, the lift's two arms, and probing the result."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from multissl_recipes import finetune_image_classification as recipe
from PIL import Image

from multissl.data.labels import LabelMap
from multissl.errors import ConfigError
from multissl.metrics import read_jsonl
from multissl.objectives.image_classification import (
    ClassifierAugmentConfig,
    ImageClassification,
    ImageClassifierModelConfig,
    LabelledImageDataConfig,
    build_image_classifier,
    label_splits,
    load_image_processor,
)
from multissl.training.loader import rows

SIDE = 32
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PER_CLASS = 40
"""Digits a class taken from the embedded MNIST set: 400 images, about 80 of them held out."""
DIGITS = LabelMap(tuple(str(d) for d in range(10)))


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first PER_CLASS real digits of each class, in the embedded corpus's layout (``<digit>/<n>.png``)."""
    from multissl.data.digits_demo import build_digits_corpus

    return build_digits_corpus(tmp_path_factory.mktemp("digits"), limit=PER_CLASS)


def _save_vit(folder: Path, seed: int = 0) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(image_size=SIDE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, pooler_act="linear")
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": SIDE, "width": SIDE}, image_mean=MEAN, image_std=STD).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretraining run folder whose model/ is a transformers ViT encoder with its image processor."""
    run = tmp_path_factory.mktemp("mae-run")
    _save_vit(run / "model")
    (run / "config.yaml").write_text("trainer: {}\n")
    return run


def _encoder_weights(run: Path) -> dict[str, torch.Tensor]:
    """The run's encoder weights under the names transformers gives them in memory (v5 renames the
    saved ``encoder.layer.*`` keys on load), without the unused pooler."""
    from transformers import AutoModel

    state = AutoModel.from_pretrained(run / "model").state_dict()
    return {k: v for k, v in state.items() if not k.startswith("pooler.")}


def _args(out: Path, digits: Path, steps: int, **extra: Any) -> list[str]:
    args = [f"trainer.output_dir={out}", f"data.files=[{digits}]", "data.validation_fraction=0.2",
            f"trainer.max_steps={steps}", "trainer.batch_size=64", "trainer.progress_bar=false",
            "trainer.trackers=[]", "trainer.log_every=1", "trainer.warmup_steps=0", "trainer.eval_every=0",
            "trainer.save_every=0", "trainer.lr=3e-3"]
    return args + [f"{k}={v}" for k, v in extra.items()]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, digits: Path, pretrained: Path) -> tuple[Any, Path]:
    out = tmp_path_factory.mktemp("finetuned")
    return recipe.main(_args(out, digits, 100, **{"model.init_from": pretrained, "augment.scale": "[0.8,1.0]"})), out


# --------------------------------------------------------------------------- start points
def test_start_points_keep_or_drop_the_pretrained_weights(pretrained: Path) -> None:
    labels = LabelMap(("cat", "dog", "fox"))
    saved = _encoder_weights(pretrained)

    def build(**kw: Any) -> tuple[Any, str]:
        return build_image_classifier(ImageClassifierModelConfig(**kw), labels)

    for ref in (pretrained, pretrained / "model"):  # a run folder or the model folder itself
        tuned, base = build(init_from=str(ref))
        assert type(tuned).__name__ == "ViTForImageClassification" and base == str(pretrained / "model")
        assert tuned.config.id2label == labels.id2label and tuned.config.label2id == labels.label2id
        state = tuned.state_dict()
        assert set(state) == {f"vit.{k}" for k in saved} | {"classifier.weight", "classifier.bias"}
        for name, value in saved.items():
            assert torch.equal(state[f"vit.{name}"], value), name
        assert tuned.classifier.out_features == 3
    processor = load_image_processor(ImageClassifierModelConfig(init_from=str(pretrained)))
    assert type(processor).__name__ == "ViTImageProcessor" and list(processor.image_mean) == MEAN
    fresh, base = build(init_from=str(pretrained), random_init=True)
    assert base == "" and fresh.config.id2label == labels.id2label
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in state.items()}
    for name, value in saved.items():
        if name.endswith("weight") and "layernorm" not in name:
            assert not torch.allclose(fresh.state_dict()[f"vit.{name}"], value), name
    assert load_image_processor(ImageClassifierModelConfig(init_from=str(pretrained), random_init=True)) is not None
    dropped, _ = build(init_from=str(pretrained), kwargs={"hidden_dropout_prob": 0.2})
    assert dropped.config.hidden_dropout_prob == 0.2
    assert load_image_processor(ImageClassifierModelConfig()) is None, "the tiny ResNet is timm's"


def test_bad_transformers_start_points_are_one_line_errors(pretrained: Path, tmp_path: Path) -> None:
    from transformers import SwinConfig, ViTMAEConfig

    from multissl.models.saved import load_saved_encoder

    labels = LabelMap(("a", "b"))
    bare = tmp_path / "bare"
    shutil.copytree(pretrained / "model", bare)
    (bare / "preprocessor_config.json").unlink()
    mae = tmp_path / "mae"
    ViTMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(mae)
    swin = tmp_path / "swin"
    SwinConfig(embed_dim=16, depths=[1], num_heads=[2]).save_pretrained(swin)
    cases = {
        (str(bare), ""): f"{bare} has no preprocessor_config.json",
        (str(mae), ""): "'vit_mae' model, which masks patches at random even at inference",
        (str(swin), ""): "holds a transformers 'swin' model, not a timm image model .* nor a transformers vit",
        (str(pretrained), "image_size"): "model.image_size=24: a transformers image model",
        (str(pretrained), "kwargs"): "model.kwargs: hidden_dropout not in the 'vit' config",
    }
    for (ref, extra), message in cases.items():
        kw: dict[str, Any] = {"image_size": 24} if extra == "image_size" else {}
        if extra == "kwargs":
            kw["kwargs"] = {"hidden_dropout": 0.1}
        with pytest.raises(ConfigError, match=message) as err:
            build_image_classifier(ImageClassifierModelConfig(init_from=ref, **kw), labels)
        assert "\n" not in str(err.value)
    for folder in (bare, mae):  # the probe refuses them the same way
        with pytest.raises(ConfigError, match=str(folder)) as err:
            load_saved_encoder(folder)
        assert "\n" not in str(err.value)
    net, _ = build_image_classifier(ImageClassifierModelConfig(init_from=str(pretrained)), labels)
    with pytest.raises(ValueError, match="needs its image processor"):
        ImageClassification(net, labels, ClassifierAugmentConfig())


# ------------------------------------------------------------------------------- export
def _probabilities(objective: ImageClassification, paths: list[str]) -> torch.Tensor:
    """Class probabilities through our own eval path: the eval collator (the saved image processor) and
    the task's classifier module."""
    samples = [{"path": p, "bytes": None, "label": 0} for p in paths]
    batch = objective.eval_collator()(samples, torch.Generator())
    with torch.no_grad():
        return objective.model.eval()(batch["pixel_values"]).softmax(-1)


def test_pipeline_runs_the_saved_folder_as_our_eval_path_does(run: tuple[Any, Path]) -> None:
    """transformers alone (``pipeline``) loads the fine-tuned folder and gives, image for image, the top
    label and the probabilities of our eval path on the saved model and on the trained one."""
    from transformers import pipeline

    result, out = run
    folder = out / "model"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {
        p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "vit" and config["architectures"] == ["ViTForImageClassification"]
    assert config["id2label"] == {str(i): n for i, n in DIGITS.id2label.items()}
    preds = read_jsonl(out / "predictions.jsonl")
    paths = [p["path"] for p in preds[::16]]
    cfg = ImageClassifierModelConfig(init_from=str(out))  # the run folder: its model/
    net, base = build_image_classifier(cfg, DIGITS)
    assert base == str(folder)
    saved = ImageClassification(net, DIGITS, ClassifierAugmentConfig(), processor=load_image_processor(cfg))
    ours = _probabilities(saved, paths)
    trained = ImageClassification(result.model, DIGITS, ClassifierAugmentConfig(), processor=load_image_processor(cfg))
    torch.testing.assert_close(_probabilities(trained, paths), ours, rtol=0, atol=1e-6)
    classify = pipeline("image-classification", model=str(folder))
    by_path = {p["path"]: p for p in preds}
    for path, probs in zip(paths, ours):
        scores = classify(Image.open(path), top_k=len(DIGITS.names))
        assert scores[0]["label"] == DIGITS.names[int(probs.argmax())] == by_path[path]["prediction"]
        got = torch.tensor([next(s["score"] for s in scores if s["label"] == name) for name in DIGITS.names])
        torch.testing.assert_close(got, probs, rtol=0, atol=1e-5)
    card = (folder / "README.md").read_text()
    assert "library_name: transformers" in card and "pipeline_tag: image-classification" in card
    assert f'pipeline("image-classification", model="{folder}")' in card
    assert "AutoModelForImageClassification" in card


def test_fine_tuning_learns_the_digits(run: tuple[Any, Path]) -> None:
    """100 steps on 311 real digits from a random tiny ViT: held-out accuracy (89 images) well above chance
    (0.1). Measured: 0.31 (0.25 with augment.scale [0.35, 1]; a 2-layer ViT on 16 patches learns slowly)."""
    result, out = run
    assert result.best_metric == "accuracy" and result.final_metrics["accuracy"] > 0.25
    losses = [r["train/loss"] for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_the_fine_tuned_folder_probes(run: tuple[Any, Path], digits: Path, tmp_path: Path) -> None:
    """``multissl probe`` takes the classifier's encoder (transformers' AutoModel drops the head)."""
    from multissl.models.saved import load_saved_encoder
    from multissl.probe import ProbeConfig, probe_output

    _, out = run
    encoder = load_saved_encoder(out)
    assert encoder.modality == "image" and type(encoder.model).__name__ == "ViTModel"
    table = tmp_path / "digits.jsonl"
    table.write_text("".join(json.dumps({"path": str(p), "label": p.parent.name}) + "\n"
                             for p in sorted(digits.glob("*/*.png"))))
    probed = probe_output(out, ProbeConfig(task="files", files=[str(table)], knn_k=5), device="cpu")
    assert probed["modality"] == "image" and probed["classes"] == 10
    assert probed["linear_acc"] > 0.2 and probed["knn_acc"] > 0.2


# ---------------------------------------------------------------------- linear evaluation
def test_linear_evaluation_leaves_the_encoder_bit_identical(pretrained: Path, digits: Path, tmp_path: Path) -> None:
    train, _, labels = label_splits(LabelledImageDataConfig(files=[str(digits)], validation_fraction=0.2))
    cfg = ImageClassifierModelConfig(init_from=str(pretrained), freeze_backbone=True)
    net, _ = build_image_classifier(cfg, labels)
    objective = ImageClassification(net, labels, ClassifierAugmentConfig(), freeze_backbone=True,
                                    processor=load_image_processor(cfg))
    model = objective.model.train()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["net.classifier.weight",
                                                                           "net.classifier.bias"]
    assert model.training and net.classifier.training and not net.training and not net.vit.training
    batch = objective.collator()(rows(train.data, list(range(16))), torch.Generator().manual_seed(0))
    assert batch["pixel_values"].shape == (16, 3, SIDE, SIDE)
    assert len(pickle.dumps(objective.eval_collator())) < 20_000, "spawned DataLoader workers unpickle it"
    # through the trainer, with an evaluation in between (it calls train() again after it)
    result = recipe.main(_args(tmp_path, digits, 4, **{"model.init_from": pretrained, "model.freeze_backbone": "true",
                                                       "trainer.eval_every": 2}))
    state = result.model.state_dict()
    for name, value in _encoder_weights(pretrained).items():
        assert torch.equal(state[f"vit.{name}"], value), f"{name} moved under linear evaluation"
    start, _ = build_image_classifier(cfg, labels)
    assert not torch.equal(state["classifier.weight"], start.classifier.weight), "the classifier trains"


# -------------------------------------------------------------------------------- lift
def test_lift_runs_both_arms(tmp_path: Path, digits: Path, pretrained: Path) -> None:
    from multissl.cli import main as cli

    out = tmp_path / "lift"
    rc = cli(["lift", "image-classification", "--pretrained", str(pretrained), "--fractions", "0.5", "--seeds", "0",
              "--output-dir", str(out), f"data.files=[{digits}]", "data.validation_fraction=0.2",
              "trainer.max_steps=2", "trainer.batch_size=32", "trainer.progress_bar=false", "trainer.trackers=[]"])
    assert rc == 0
    report = json.loads((out / "lift.json").read_text())
    assert sorted(r["arm"] for r in report["runs"]) == ["from scratch", "pretrained"]
    weights = {}
    for r in report["runs"]:
        folder = Path(r["output_dir"]) / "model"
        assert (folder / "preprocessor_config.json").is_file()
        weights[r["arm"]] = _encoder_weights(folder.parent)["embeddings.patch_embeddings.projection.weight"]
    assert not torch.allclose(weights["pretrained"], weights["from scratch"])


def test_layer_decay_trains_earlier_layers_slower(pretrained: Path, digits: Path, tmp_path: Path) -> None:
    """``model.layer_decay=0.5`` on the 2-layer ViT: the embeddings step at lr/8, its layers at lr/4
    and lr/2, the head at lr (logged as ``train/lr/<group>`` where it differs from ``train/lr``)."""
    out = tmp_path / "decayed"
    recipe.main(_args(out, digits, 2, **{"model.init_from": pretrained, "model.layer_decay": 0.5, "trainer.lr": 1e-3,
                                         "trainer.lr_schedule": "constant"}))
    first = next(r for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r)
    assert first["train/lr"] == pytest.approx(1e-3)
    assert [first[f"train/lr/layer_{i}"] for i in range(3)] == pytest.approx([1e-3 / 8, 1e-3 / 4, 1e-3 / 2])
    assert "train/lr/layer_3" not in first
