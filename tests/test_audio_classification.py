"""The audio-classification task (keyword spotting) end to end on a small keyword corpus."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("espeakng_loader")

from multissl_recipes import finetune_audio_classification as recipe  # noqa: E402

from multissl import config  # noqa: E402
from multissl.data.audio import AudioCollator  # noqa: E402
from multissl.data.audio_tasks import LabelledAudioDataConfig  # noqa: E402
from multissl.data.keyword_demo import KEYWORDS, build_keyword_corpus  # noqa: E402
from multissl.data.labels import LabelMap  # noqa: E402
from multissl.errors import ConfigError, DataError  # noqa: E402
from multissl.metrics import read_jsonl  # noqa: E402
from multissl.objectives.audio_classification import (  # noqa: E402
    AudioClassification,
    AudioClassifierModelConfig,
    build_audio_classifier,
    feature_extractor_for,
    label_splits,
)
from multissl.objectives.wav2vec2 import W2V_SIZES  # noqa: E402
from multissl.training.skips import BadInputs, skip_id  # noqa: E402
from tests.conftest import assert_resume_is_exact  # noqa: E402

# Ten voices, 100 one-second clips. At validation_fraction 0.25 the speaker hash holds out the last three
# (30 clips) and trains on seven.
SPEAKERS = ("en+m1", "en+f1", "en-us+m3", "en-us+f4", "en-gb-x-rp+m2", "en-gb-x-rp+f1", "en-029+m1",
            "en+m4", "en-us+f1", "en-gb-x-rp+f4")
EVAL_SPEAKERS = set(SPEAKERS[-3:])
SILENT = "silent_yes.wav"
RUN_STEPS = 40


def _rows(manifest: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data_cfg(manifest: Path, **extra: Any) -> LabelledAudioDataConfig:
    return LabelledAudioDataConfig(manifest=str(manifest), validation_fraction=0.25, min_seconds=0.25,
                                   **extra)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small corpus plus one silent training clip (it passes the header probe; the collator skips it)."""
    folder = tmp_path_factory.mktemp("keywords")
    manifest = build_keyword_corpus(folder, speakers=SPEAKERS)
    sf.write(folder / SILENT, np.zeros(16000, dtype=np.float32), 16000)
    rows = [*_rows(manifest), {"path": SILENT, "duration": 1.0, "label": "yes", "speaker": SPEAKERS[0]}]
    return _write_manifest(folder / "with_silent.jsonl", rows)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wav2vec 2.0 output folder as the pretraining recipe writes it: the tiny preset with a narrower
    feature encoder, random weights (fast; it learns a little faster than the 64-channel one, too)."""
    from multissl.objectives.wav2vec2 import Wav2Vec2LossConfig, Wav2Vec2ModelConfig, Wav2Vec2Pretraining

    torch.manual_seed(0)
    model_cfg = Wav2Vec2ModelConfig(size="tiny", dropout=0.0, conv_dim=32)
    objective = Wav2Vec2Pretraining(model_cfg, Wav2Vec2LossConfig(), AudioCollator())
    out = tmp_path_factory.mktemp("w2v") / "model"
    objective.save_pretrained(objective.model, out)
    return out


def _args(out: Path, manifest: Path, pretrained: Path, steps: int, **extra: Any) -> list[str]:
    args = [f"trainer.output_dir={out}", f"data.manifest={manifest}", f"model.init_from={pretrained}",
            f"trainer.max_steps={steps}", "trainer.progress_bar=false", "trainer.trackers=[]",
            "trainer.log_every=5", "trainer.warmup_steps=5", "trainer.eval_every=0", "trainer.save_every=0",
            "data.validation_fraction=0.25", "data.max_batch_samples=320000"]  # 20 clips a batch
    return args + [f"{k}={v}" for k, v in extra.items()]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, corpus: Path, pretrained: Path) -> tuple[Any, Path]:
    out = tmp_path_factory.mktemp("run")
    extra = {"trainer.lr": 3e-3, "data.labels": list(KEYWORDS)}
    result = recipe.main(_args(out, corpus, pretrained, RUN_STEPS, **extra))
    return result, out


def test_learns_keywords_of_held_out_speakers(run: tuple[Any, Path]) -> None:
    """Above chance on three unseen voices after 40 steps from random weights: held-out loss well under
    the uniform guess's ln(10) = 2.30 (measured 1.42), accuracy at least twice chance (measured 0.37 =
    11 of 30 clips; 6 or more right by chance has p = 0.03)."""
    result, out = run
    rows = read_jsonl(out / "metrics.jsonl")
    assert result.final_metrics["loss"] < 0.85 * math.log(10), result.final_metrics
    assert result.final_metrics["accuracy"] >= 0.2, result.final_metrics
    assert 0 < result.final_metrics["macro_f1"] <= 1
    train = [r for r in rows if "train/loss" in r]
    assert train[-1]["train/loss"] < train[0]["train/loss"] - 0.3
    assert {"throughput/audio_seconds_per_s", "train/accuracy"} <= set(train[-1])
    assert not any(k.startswith("train/_") for k in train[-1]), "per-class counts are for eval summaries"
    skipped = train[-1]["data/skipped_audio_files"]
    assert skipped == 1 < _times_drawn(out, SILENT, RUN_STEPS), "the silent clip, once however often it was drawn"


def _times_drawn(out: Path, name: str, steps: int) -> int:
    """How often the run's first ``steps`` training batches hold the file ``name``."""
    cfg = config.load(recipe.AudioClassificationConfig, ["--config", str(out / "config.yaml")])
    train, _, _, _ = label_splits(cfg.data, lambda: Path(cfg.data.manifest))
    sampler = train.make_batch_sampler(batch_size=0, seed=cfg.trainer.seed, shuffle=True, drop_last=True,
                                       rank=0, world_size=1, split_tag=0)
    index = [Path(p).name for p in train.data["path"]].index(name)
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < steps:
        sampler.set_epoch(epoch)
        batches += [[i for i, _ in b] for b in sampler]
        epoch += 1
    return sum(index in b for b in batches[:steps])


def test_predictions_and_pipeline_agree(run: tuple[Any, Path], corpus: Path) -> None:
    """predictions.jsonl holds every eval clip; the exported folder loads in transformers' pipeline and
    gives the same top label and score on eval files."""
    from transformers import pipeline

    result, out = run
    preds = read_jsonl(out / "predictions.jsonl")
    held = {r["path"] for r in _rows(corpus) if r["speaker"] in EVAL_SPEAKERS}
    assert {Path(p["path"]).name for p in preds} == {Path(p).name for p in held}
    assert all(set(p) == {"path", "label", "prediction", "score"} for p in preds)
    assert all(Path(p["path"]).name.startswith(p["label"] + "_") for p in preds), "labels stay with files"
    accuracy = np.mean([p["label"] == p["prediction"] for p in preds])
    assert accuracy == pytest.approx(result.final_metrics["accuracy"])
    classify = pipeline("audio-classification", model=str(out / "model"))
    assert classify.model.config.id2label == dict(enumerate(KEYWORDS)), "data.labels fixes the id order"
    for p in preds[:6]:
        audio, rate = sf.read(p["path"], dtype="float32")
        top = classify({"raw": audio, "sampling_rate": rate}, top_k=1)[0]
        assert top["label"] == p["prediction"]
        assert top["score"] == pytest.approx(p["score"], abs=2e-3)
    card = (out / "model" / "README.md").read_text()
    assert "pipeline_tag: audio-classification" in card and 'pipeline("audio-classification"' in card


def test_padding_does_not_leak_into_the_pooled_vector(run: tuple[Any, Path], corpus: Path) -> None:
    """A short clip padded in a batch with a long one gets the logits it gets alone: the saved feature
    extractor returns the attention mask and the model pools valid frames only."""
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    _, out = run
    extractor = AutoFeatureExtractor.from_pretrained(out / "model")
    model = AutoModelForAudioClassification.from_pretrained(out / "model").eval()
    assert extractor.return_attention_mask
    paths = [corpus.parent / r["path"] for r in _rows(corpus)[:2]]
    short, long = sf.read(paths[0], dtype="float32")[0][2000:10000], sf.read(paths[1], dtype="float32")[0]
    padded = extractor([short, long], sampling_rate=16000, padding=True, return_tensors="pt")
    assert padded["attention_mask"][0].sum() == len(short) < padded["input_values"].shape[1]
    with torch.no_grad():
        batch = model(**padded).logits
        alone = model(**extractor(short, sampling_rate=16000, return_tensors="pt")).logits
    torch.testing.assert_close(batch[0], alone[0], rtol=1e-4, atol=1e-4)


def test_label_map_from_data_and_stratified_label_fraction(corpus: Path) -> None:
    train, held, labels, _ = label_splits(_data_cfg(corpus), lambda: corpus)
    assert labels.names == tuple(sorted(KEYWORDS))
    assert set(held.data["speaker"]) == EVAL_SPEAKERS and set(train.data["label"]) == set(range(10))
    full = Counter(train.data["label"])
    part, _, _, _ = label_splits(_data_cfg(corpus, label_fraction=0.34), lambda: corpus)
    counts = Counter(part.data["label"])
    assert counts == {c: math.ceil(0.34 * n) for c, n in full.items()}
    assert set(part.data["path"]) < set(train.data["path"])
    configured, _, named, _ = label_splits(_data_cfg(corpus, labels=list(KEYWORDS)), lambda: corpus)
    assert named.names == KEYWORDS
    as_names = [named.names[i] for i in configured.data["label"]]
    assert as_names == [labels.names[i] for i in train.data["label"]]


def test_unknown_labels_name_the_file_and_column(corpus: Path, tmp_path: Path) -> None:
    rows = _rows(corpus)
    victim = next(r for r in rows if r["speaker"] in EVAL_SPEAKERS)
    victim["label"] = "maybe"
    for r in rows:
        r["path"] = str(corpus.parent / r["path"])
    manifest = _write_manifest(tmp_path / "m.jsonl", rows)
    where = re.escape(f"(eval): {victim['path']}, column 'label': unknown label 'maybe'")
    with pytest.raises(DataError, match=where):
        label_splits(_data_cfg(manifest), lambda: manifest)
    # a training label missing from data.labels, even where label_fraction would leave most such rows out
    without_go = _data_cfg(corpus, labels=[k for k in KEYWORDS if k != "go"], label_fraction=0.1)
    with pytest.raises(DataError, match=r"go_en.*\.wav, column 'label': unknown label 'go'"):
        label_splits(without_go, lambda: corpus)


def test_missing_label_column_is_an_error(corpus: Path, tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "label"} | {"path": str(corpus.parent / r["path"])}
            for r in _rows(corpus)]
    manifest = _write_manifest(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataError, match=r"no 'label' column"):
        recipe.main([f"data.manifest={manifest}", f"trainer.output_dir={tmp_path}", "trainer.trackers=[]"])


def test_skipped_file_keeps_labels_aligned(corpus: Path) -> None:
    """The silent clip sits mid-batch: labels taken by position would shift onto the wrong clip."""
    train, _, labels, _ = label_splits(_data_cfg(corpus), lambda: corpus)
    silent = [Path(p).name for p in train.data["path"]].index(SILENT)
    samples = [train[silent - 2], train[silent], train[silent - 1]]
    assert samples[0]["label"] != samples[2]["label"] != samples[1]["label"]
    objective = AudioClassification(torch.nn.Identity(), labels, train.collator(), None)
    batch = objective.collator()(samples, torch.Generator().manual_seed(0))
    assert len(batch["path"]) == 2 and SILENT not in {Path(p).name for p in batch["path"]}
    for path, label in zip(batch["path"], batch["labels"].tolist()):
        assert Path(path).name.startswith(labels.names[label] + "_")
    counts = objective.count(batch)
    silent_id = BadInputs((skip_id(str(samples[1]["path"])),))
    assert counts == {"samples": 2, "audio_seconds": pytest.approx(2.0), "skipped_audio_files": silent_id}


def test_model_building(pretrained: Path) -> None:
    from transformers import Wav2Vec2Model

    labels = LabelMap(("a", "b", "c"))
    base = Wav2Vec2Model.from_pretrained(pretrained)

    def build(**kw: Any) -> tuple[Any, str]:
        return build_audio_classifier(AudioClassifierModelConfig(init_from=str(pretrained), **kw), labels)

    tuned, source = build()
    fresh, _ = build(random_init=True)
    weight = "encoder.layers.0.attention.q_proj.weight"
    torch.testing.assert_close(tuned.wav2vec2.state_dict()[weight], base.state_dict()[weight])
    assert not torch.allclose(fresh.wav2vec2.state_dict()[weight], base.state_dict()[weight])
    assert fresh.config.to_diff_dict() == tuned.config.to_diff_dict() and source == str(pretrained)
    assert not any(p.requires_grad for p in tuned.wav2vec2.feature_extractor.parameters())
    assert all(p.requires_grad for p in tuned.wav2vec2.encoder.parameters())
    probe, _ = build(freeze_base_model=True)
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == [
        "projector.weight", "projector.bias", "classifier.weight", "classifier.bias"]
    scratch, _ = build_audio_classifier(AudioClassifierModelConfig(mask_time_prob=0.1), labels)
    hidden, layers, heads, ffn, conv, _ = W2V_SIZES["tiny"]
    c = scratch.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, list(c.conv_dim),
            c.feat_extract_norm) == (hidden, layers, heads, ffn, [conv] * 7, "layer"), "the wav2vec2 tiny preset"
    assert scratch.config.mask_time_prob == 0.1 and scratch.config.id2label == {0: "a", 1: "b", 2: "c"}
    with pytest.raises(ConfigError, match="16000 Hz"):
        feature_extractor_for(tuned.config, 8000, True, str(pretrained))


def test_resume_is_exact(tmp_path: Path, corpus: Path, pretrained: Path) -> None:
    """With SpecAugment on (transformers draws its masks from numpy's global RNG) and dropout."""
    args = _args(tmp_path, corpus, pretrained, 4, **{"trainer.save_every": 2, "trainer.log_every": 1,
                                                     "model.mask_time_prob": 0.2, "model.dropout": 0.1,
                                                     "data.max_seconds": 2.0, "data.max_batch_samples": 64000,
                                                     "trainer.eval_max_batches": 1})
    assert_resume_is_exact(recipe.main, args, tmp_path, 4)


def test_shipped_config_loads() -> None:
    cfg = config.load(recipe.AudioClassificationConfig, [], recipe.DEFAULT_CONFIG)
    assert cfg.trainer.max_steps > 0 and cfg.model.freeze_feature_encoder and not cfg.model.freeze_base_model
    assert recipe.DEFAULT_CONFIG.read_text().startswith("# multissl finetune audio-classification ")
