"""Text classification fine-tuning: labels, metrics, the recipe end to end, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from multissl_recipes import finetune_text_classification as task
from multissl_recipes import mlm

from multissl.data.labels import LabelMap, infer_label_map, stratified_subset
from multissl.errors import ConfigError, DataError
from multissl.metrics import MetricSums
from multissl.objectives.classification import classification_step, summarize_classification
from tests.conftest import assert_resume_is_exact, tiny_args


def _args(out: Path, steps: int = 20, **extra: object) -> list[str]:
    args = [f"trainer.output_dir={out}", f"trainer.max_steps={steps}", "trainer.batch_size=16",
            "trainer.log_every=5", "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress_bar=false",
            "trainer.trackers=[]", "data.max_seq_len=64"]
    return args + [f"{k}={v}" for k, v in extra.items()]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MLM output (a few steps: the recipe mechanics, not its quality, are under test here)."""
    out = tmp_path_factory.mktemp("mlm")
    mlm.main(tiny_args(out, steps=4))
    return out


# ----------------------------------------------------------------------------- labels
def test_label_map_from_names_ids_and_config() -> None:
    assert infer_label_map(["b", "a", "b", None]).names == ("a", "b")
    assert infer_label_map([2, 0, 1]).names == ("0", "1", "2")
    assert infer_label_map(["x"], configured=["no", "yes"]).names == ("no", "yes")
    labels = LabelMap(("neg", "pos"))
    assert labels.to_id("pos", "r") == 1 and labels.to_id(0, "r") == 0
    with pytest.raises(DataError, match=r"f.csv: row 7, column 'label': unknown label 'postive'; known labels: neg, pos"):
        labels.to_id("postive", "f.csv: row 7, column 'label'")
    with pytest.raises(DataError, match="label id 5 is outside 0..1"):
        labels.to_id(5, "row 1")
    with pytest.raises(DataError, match="at least 2 classes"):
        infer_label_map(["only"])
    with pytest.raises(DataError, match="negative"):
        infer_label_map([0, -1, 1])


def test_stratified_subset_keeps_each_class_share() -> None:
    labels = [0] * 80 + [1] * 15 + [2] * 5
    small = stratified_subset(labels, 0.1, seed=3)
    counts = [sum(labels[i] == c for i in small) for c in range(3)]
    assert counts == [8, 2, 1]  # ceil(share) of each class, and never none
    assert set(small) <= set(stratified_subset(labels, 0.5, seed=3)), "a smaller subset is inside a larger one"
    assert small != stratified_subset(labels, 0.1, seed=4)
    assert stratified_subset(labels, 1.0, seed=3) == list(range(100))


# ---------------------------------------------------------------------------- metrics
def _reference_scores(y: list[int], p: list[int], k: int) -> tuple[float, float]:
    f1s = []
    for c in range(k):
        tp = sum(a == c and b == c for a, b in zip(y, p))
        fp = sum(a != c and b == c for a, b in zip(y, p))
        fn = sum(a == c and b != c for a, b in zip(y, p))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    tp = sum(a == 1 and b == 1 for a, b in zip(y, p))
    tn = sum(a == 0 and b == 0 for a, b in zip(y, p))
    fp = sum(a == 0 and b == 1 for a, b in zip(y, p))
    fn = sum(a == 1 and b == 0 for a, b in zip(y, p))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return sum(f1s) / len(f1s), mcc


@pytest.mark.parametrize("k", [2, 4])
def test_pooled_macro_f1_and_mcc_match_a_direct_computation(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    y = torch.randint(0, k, (103,), generator=g)
    logits = torch.randn(103, k, generator=g) + 2.0 * torch.nn.functional.one_hot(y, k)
    sums = MetricSums()
    for part in (slice(0, 10), slice(10, 77), slice(77, 103)):  # uneven batches
        sums.add(classification_step(logits[part], y[part], k))
    got = summarize_classification(sums.reduce(None), k)
    f1, mcc = _reference_scores(y.tolist(), logits.argmax(-1).tolist(), k)
    assert got["macro_f1"] == pytest.approx(f1, abs=1e-5)
    assert got["accuracy"] == pytest.approx((logits.argmax(-1) == y).float().mean().item(), abs=1e-6)
    assert ("matthews_correlation" in got) == (k == 2)
    if k == 2:
        assert got["matthews_correlation"] == pytest.approx(mcc, abs=1e-5)
    assert not any(name.startswith("_") for name in got)


# ----------------------------------------------------------------------------- recipe
def test_learns_the_topic_task_and_output_runs_in_a_pipeline(tmp_path: Path, pretrained: Path) -> None:
    """From a pretrained output, held-out accuracy clearly beats always answering the majority class;
    the exported model loads in transformers' pipeline and predicts what predictions.jsonl says."""
    from transformers import pipeline

    result = task.main(_args(tmp_path, steps=120, **{"trainer.eval_every": 40, "trainer.lr": 2e-3,
                                                   "trainer.batch_size": 32, "model.init_from": pretrained}))
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    majority = max(sum(r["label"] == c for r in rows) for c in {r["label"] for r in rows}) / len(rows)
    assert result.final_metrics["accuracy"] > majority + 0.1, (result.final_metrics, majority)
    assert result.best_step in (40, 80, 120)
    accuracy = sum(r["label"] == r["prediction"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(result.final_metrics["accuracy"], abs=1e-6)
    classify = pipeline("text-classification", model=str(tmp_path / "model"), device="cpu")
    for row in rows[:8]:
        out = classify(row["text"], truncation=True, max_length=64)[0]
        assert out["label"] == row["prediction"] and out["score"] == pytest.approx(row["score"], abs=1e-3)
    card = (tmp_path / "model" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "accuracy" in card


def test_random_init_keeps_architecture_and_tokenizer(tmp_path: Path, pretrained: Path) -> None:
    from transformers import AutoModelForMaskedLM

    result = task.main(_args(tmp_path, steps=2, **{"model.init_from": pretrained, "model.random_init": "true"}))
    source = AutoModelForMaskedLM.from_pretrained(pretrained / "model")
    assert result.model.config.hidden_size == source.config.hidden_size
    assert result.model.config.num_hidden_layers == source.config.num_hidden_layers
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "model").get_vocab() == \
        AutoTokenizer.from_pretrained(pretrained / "model").get_vocab()
    pretrained_emb = source.get_input_embeddings().weight
    assert not torch.allclose(result.model.get_input_embeddings().weight, pretrained_emb, atol=1e-2)


def test_from_a_clm_output_and_from_scratch(tmp_path: Path) -> None:
    from multissl_recipes import clm
    from transformers import AutoTokenizer, pipeline

    clm.main(tiny_args(tmp_path / "clm", steps=2))
    gpt = task.main(_args(tmp_path / "gpt", steps=2, **{"model.init_from": tmp_path / "clm"}))
    assert type(gpt.model).__name__ == "GPT2ForSequenceClassification"
    # GPT-2's classifier reads the last non-padding token: the saved tokenizer ends every text with
    # end-of-text (a distinct pad token), also when truncating, so pipeline() scores as training did
    tok = AutoTokenizer.from_pretrained(tmp_path / "gpt" / "model")
    assert tok.pad_token_id != tok.eos_token_id
    ids = tok(["short text", "a much longer text " * 40], truncation=True, max_length=64)["input_ids"]
    assert [x[-1] for x in ids] == [tok.eos_token_id] * 2 and len(ids[1]) == 64
    pretraining_tok = AutoTokenizer.from_pretrained(tmp_path / "clm" / "model")  # generation: prompts stay open
    assert pretraining_tok("a")["input_ids"][-1] != tok.eos_token_id
    rows = [json.loads(line) for line in (tmp_path / "gpt" / "predictions.jsonl").read_text().splitlines()]
    classify = pipeline("text-classification", model=str(tmp_path / "gpt" / "model"), device="cpu")
    for row in rows[:4]:
        out = classify(row["text"], truncation=True, max_length=64)[0]
        assert out["label"] == row["prediction"] and out["score"] == pytest.approx(row["score"], abs=1e-4)
    task.main(_args(tmp_path / "plain", steps=1, **{"model.init_from": tmp_path / "clm", "data.end_with_eos": "false"}))
    assert AutoTokenizer.from_pretrained(tmp_path / "plain" / "model")("a")["input_ids"][-1] != tok.eos_token_id
    scratch = task.main(_args(tmp_path / "scratch", steps=2, **{"model.hidden_size": 32, "model.num_layers": 1,
                                                               "data.vocab_size": 500}))
    assert (tmp_path / "scratch" / "tokenizer" / "tokenizer.json").is_file()
    assert scratch.model.config.num_labels == 5


def test_resume_is_exact(tmp_path: Path, pretrained: Path) -> None:
    args = _args(tmp_path, steps=10, **{"trainer.save_every": 5, "trainer.eval_every": 5,
                                         "model.init_from": pretrained, "model.dropout": 0.1})
    assert_resume_is_exact(task.main, args, tmp_path, 10)


# -------------------------------------------------------------------------- bad input
def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _files(tmp_path: Path, train_rows: list[dict], eval_rows: list[dict]) -> dict[str, object]:
    return {"data.files": f"[{_write(tmp_path / 'train.jsonl', train_rows)}]",
            "data.eval_files": f"[{_write(tmp_path / 'eval.jsonl', eval_rows)}]"}


TRAIN = [{"text": f"good thing number {i}", "label": "pos"} for i in range(20)] + \
        [{"text": f"bad thing number {i}", "label": "neg"} for i in range(20)]


def test_unknown_eval_label_names_row_and_column(tmp_path: Path, pretrained: Path) -> None:
    eval_rows = [{"text": "fine", "label": "pos"}, {"text": "meh", "label": "neutral"}]
    with pytest.raises(DataError, match=r"eval\.jsonl: row 2, column 'label': unknown label 'neutral'"):
        task.main(_args(tmp_path, 2, **_files(tmp_path, TRAIN, eval_rows), **{"model.init_from": pretrained}))


def test_missing_label_column_is_named(tmp_path: Path, pretrained: Path) -> None:
    rows = [{"text": r["text"], "sentiment": r["label"]} for r in TRAIN]
    with pytest.raises(DataError, match=r"no column 'label' \(columns: text, sentiment\); set data.label_column"):
        task.main(_args(tmp_path, 2, **_files(tmp_path, rows, rows[:4]), **{"model.init_from": pretrained}))
    result = task.main(_args(tmp_path / "ok", 2, **_files(tmp_path, rows, rows[:4]),
                             **{"model.init_from": pretrained, "data.label_column": "sentiment"}))
    assert result.model.config.id2label == {0: "neg", 1: "pos"}


def test_empty_texts_and_missing_labels_are_counted_skips(tmp_path: Path, pretrained: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    rows = TRAIN + [{"text": "  ", "label": "pos"}, {"text": "no label here", "label": None}]
    result = task.main(_args(tmp_path, 2, **_files(tmp_path, rows, TRAIN[:4]), **{"model.init_from": pretrained}))
    out = capsys.readouterr().out
    assert "skipped 2 of 42 rows" in out and "row 41 (empty text)" in out and "row 42 (no label)" in out
    assert result.train_size == 40


def test_label_fraction_and_config_errors(tmp_path: Path, pretrained: Path) -> None:
    result = task.main(_args(tmp_path, 2, **_files(tmp_path, TRAIN, TRAIN[:4]),
                             **{"model.init_from": pretrained, "data.label_fraction": 0.25, "trainer.batch_size": 4}))
    assert result.train_size == 10  # 5 of each class
    with pytest.raises(ConfigError, match=r"the training set \(10 samples\) is smaller than one batch \(16"):
        task.main(_args(tmp_path / "small", 2, **_files(tmp_path, TRAIN, TRAIN[:4]),
                        **{"model.init_from": pretrained, "data.label_fraction": 0.25}))
    with pytest.raises(ConfigError, match="data.label_fraction must be in"):
        task.main(_args(tmp_path, 2, **{"data.label_fraction": 0}))
    with pytest.raises(ConfigError, match="model.init_from='/nonexistent/run': no such run or model folder: /nonexistent/run"):
        task.main(_args(tmp_path / "x", 2, **{"model.init_from": "/nonexistent/run"}))
