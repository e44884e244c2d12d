"""The MLM and CLM recipes end to end on the embedded corpus, at tiny sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from multissl_recipes import clm, mlm

from multissl.metrics import read_jsonl
from tests.conftest import assert_resume_is_exact, tiny_args


def _eval_losses(out: Path) -> list[float]:
    return [r["eval/loss"] for r in read_jsonl(out / "metrics.jsonl") if "eval/loss" in r]


def _same_logits(model_dir: Path, trained: torch.nn.Module, auto: str) -> None:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    loaded = getattr(transformers, auto).from_pretrained(model_dir).eval()
    batch = tok(["The with statement is used to wrap a block.", "Names refer to objects."], return_tensors="pt",
                padding=True)
    trained.eval()
    with torch.no_grad():
        a = loaded(**batch).logits
        b = trained(**batch).logits
    torch.testing.assert_close(a, b)


def test_mlm_learns_and_output_loads(tmp_path: Path) -> None:
    result = mlm.main(tiny_args(tmp_path, steps=100, **{"trainer.eval_every": 50, "trainer.lr": 2e-3}))
    losses = _eval_losses(tmp_path)
    # from ln(vocab) = 6.9 at random init; 0.9 nats is far outside step-to-step noise (~0.05)
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.9, losses
    assert result.final_metrics["masked_accuracy"] > 0.02  # chance is 1/1000
    assert result.final_metrics["masked_fraction"] == pytest.approx(0.4, abs=0.03)  # the tiny preset masks 40%
    model_dir = tmp_path / "model"
    _same_logits(model_dir, result.model, "AutoModelForMaskedLM")
    card = (model_dir / "README.md").read_text()
    assert card.startswith("---") and "fill-mask" in card and "AutoModelForMaskedLM" in card
    assert (tmp_path / "config.yaml").is_file() and list((tmp_path / "tensorboard").rglob("events.*")) == []
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert {"throughput/tokens_per_s", "throughput/samples_per_s", "train/loss"} <= set(rows[1])
    assert {"eval/perplexity", "eval/masked_accuracy"} <= set(rows[-1])


def test_roberta_whole_word(tmp_path: Path) -> None:
    result = mlm.main(tiny_args(tmp_path, steps=8, **{"model.arch": "roberta", "masking.whole_word": "true"}))
    assert result.state.step == 8
    _same_logits(tmp_path / "model", result.model, "AutoModelForMaskedLM")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_clm_learns_and_output_loads(tmp_path: Path, arch: str) -> None:
    # the preset warms up over 100 of its 1,000 steps; 40 steps need a warm-up that ends within them
    result = clm.main(tiny_args(tmp_path, steps=40, **{"model.arch": arch, "trainer.eval_every": 20,
                                                        "trainer.lr": 2e-3, "trainer.warmup_steps": 4,
                                                        "sampling.max_new_tokens": 8}))
    losses = _eval_losses(tmp_path)
    assert losses[-1] < losses[0] - 0.7, losses
    assert result.final_metrics["next_token_accuracy"] > 0.02  # chance is 1/1000
    samples = result.final_metrics["samples"]
    assert len(samples) == 2 and all(s.startswith(p) for s, p in zip(samples, ["The return statement", "A class"]))
    _same_logits(tmp_path / "model", result.model, "AutoModelForCausalLM")


def test_tensorboard_events_written(tmp_path: Path) -> None:
    mlm.main(tiny_args(tmp_path, steps=5) + ["trainer.trackers=[tensorboard]"])
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))


def test_resume_matches_straight_run(tmp_path: Path) -> None:
    """2N straight vs N, then a fresh process resuming from the step-N checkpoint, then N more."""
    args = tiny_args(tmp_path, steps=16, **{"trainer.save_every": 8, "trainer.keep_last": 3, "model.dropout": 0.1,
                                             "trainer.eval_every": 8})
    assert_resume_is_exact(mlm.main, args, tmp_path, 16)


def test_streaming_needs_max_steps_then_runs(tmp_path: Path) -> None:
    import json

    from multissl.errors import ConfigError

    corpus = tmp_path / "corpus.jsonl"
    from multissl.data.demo import python_doc_paragraphs

    corpus.write_text("".join(json.dumps({"id": i, "body": r["text"]}) + "\n"
                              for i, r in enumerate(python_doc_paragraphs()[:600])))
    base = tiny_args(tmp_path / "run", steps=6) + [f"data.files=[{corpus}]", "data.text_column=body",
                                                  "data.streaming=true", "trainer.eval_max_batches=2"]
    with pytest.raises(ConfigError, match="set trainer.max_steps"):
        clm.main([a for a in base if not a.startswith("trainer.max_steps")] + ["trainer.max_steps=0"])
    result = clm.main(base)
    assert result.state.step == 6 and result.state.seen["samples"] == 6 * 16
    assert "loss" in result.final_metrics


@pytest.mark.parametrize("option", ["trainer.mixed_precision=bf16", "trainer.gradient_checkpointing=true"])
def test_speed_options_train(tmp_path: Path, option: str) -> None:
    """bf16 autocast (CPU here, GPU in production) and gradient checkpointing still learn."""
    result = mlm.main(tiny_args(tmp_path, steps=30, **{"trainer.lr": 2e-3}) + [option])
    rows = [r["train/loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert all(v == v for v in rows) and rows[-1] < rows[0] - 0.3, rows
    assert result.state.nonfinite_total == 0
    if "checkpointing" in option:
        assert result.model.is_activation_checkpointing


def test_samples_stop_at_the_context_length(tmp_path: Path) -> None:
    result = clm.main(tiny_args(tmp_path, steps=2, **{"data.max_seq_len": 16, "sampling.max_new_tokens": 50}))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert all(len(tok(s)["input_ids"]) <= 16 for s in result.final_metrics["samples"])


def test_spawned_workers_see_the_same_batches(tmp_path: Path) -> None:
    """The collator is a small object, not the objective: workers started with spawn (macOS, Python
    3.14) unpickle it without the model, and build the very batches the main process would."""
    mlm.main(tiny_args(tmp_path / "tok", steps=1))  # one tokenizer for both runs (WordPiece training varies)
    losses = []
    for workers, method in ((0, ""), (1, "spawn")):
        out = tmp_path / f"w{workers}"
        mlm.main(tiny_args(out, steps=3, **{"trainer.log_every": 1, "trainer.num_workers": workers,
                                            "trainer.worker_start_method": method,
                                            "data.tokenizer": str(tmp_path / "tok" / "tokenizer")}))
        losses.append([r["train/loss"] for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r])
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-6)
