"""The trainer keeps the best evaluated model (fine-tuning) and its predictions, across resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from multissl.callbacks import ModelCardCallback
from multissl.errors import ConfigError
from multissl.training.trainer import Trainer, TrainerConfig
from tests.toy import Toy, toy_data


class ScriptedScore(Toy):
    """A toy whose eval ``score`` follows a script, so the best evaluation is known in advance; it
    remembers the weights it had at each evaluation and returns one prediction row per example."""

    best_metric = "score"

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = scores
        self.weights_at: dict[int, dict[str, torch.Tensor]] = {}

    def compute(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        out = super().compute(model, batch)
        if not model.training:
            out["predictions"] = [{"step": self.steps_done, "y": float(y)} for y in batch["y"]]
        return out

    def summarize(self, metrics: dict[str, float]) -> dict[str, float]:
        metrics["score"] = self.scores[self.steps_done // 10]
        metrics["error_rate"] = metrics["score"]  # same values, opposite direction: selects differently
        return metrics

    def on_evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        self.weights_at[self.steps_done] = {k: v.clone() for k, v in model.state_dict().items()}
        return {}


def run(out: Path, scores: list[float], **kw: Any) -> tuple[Any, ScriptedScore]:
    base = dict(output_dir=str(out), max_steps=40, batch_size=16, lr=1e-2, log_every=5, progress_bar=False,
                trackers=[], seed=7, eval_every=10, save_every=10)
    base.update(kw)
    toy = ScriptedScore(scores)
    data = toy_data()
    return Trainer(TrainerConfig(**base), callbacks=[ModelCardCallback()]).fit(toy, data[:224], data[224:]), toy


def exported(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model" / "toy.pt")


def test_exports_the_best_evaluation_with_its_predictions(tmp_path: Path) -> None:
    result, toy = run(tmp_path, [0.1, 0.3, 0.9, 0.5, 0.4])
    assert result.best_step == 20 and result.best_metric == "score"
    assert result.final_metrics["score"] == 0.9  # the exported model's metrics, not the last evaluation's
    for name, value in exported(tmp_path).items():
        torch.testing.assert_close(value, toy.weights_at[20][name])
    assert not torch.equal(exported(tmp_path)["0.weight"], toy.weights_at[40]["0.weight"])
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and {r["step"] for r in rows} == {20}
    card = (tmp_path / "model" / "README.md").read_text()
    assert "0.9" in card


def test_lower_is_better_for_error_rates(tmp_path: Path) -> None:
    # evaluations at steps 0 (the untrained model, never exported), 10, 20, 30, 40
    result, _ = run(tmp_path / "low", [0.05, 0.3, 0.9, 0.2, 0.4], best_metric="error_rate")
    assert result.best_step == 30 and result.final_metrics["error_rate"] == pytest.approx(0.2)
    result, _ = run(tmp_path / "high", [0.05, 0.3, 0.9, 0.2, 0.4], best_metric="score")
    assert result.best_step == 20


def test_last_evaluation_best_needs_no_copy(tmp_path: Path) -> None:
    result, toy = run(tmp_path, [0.1, 0.2, 0.3, 0.4, 0.5])
    assert result.best_step == 40
    for name, value in exported(tmp_path).items():
        torch.testing.assert_close(value, toy.weights_at[40][name])


def test_best_survives_a_resume(tmp_path: Path) -> None:
    scores = [0.1, 0.3, 0.9, 0.5, 0.4]
    straight, toy = run(tmp_path, scores)
    want = exported(tmp_path)
    # as if killed after step 30's checkpoint: model/ holds the best so far (step 20)
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000040")
    resumed, _ = run(tmp_path, scores)
    assert resumed.best_step == 20 and resumed.final_metrics["score"] == 0.9
    for name, value in exported(tmp_path).items():
        torch.testing.assert_close(value, want[name])
    again, _ = run(tmp_path, scores)  # rerunning a finished run keeps the best too
    assert again.best_step == 20
    for name, value in exported(tmp_path).items():
        torch.testing.assert_close(value, want[name])


def test_unknown_best_metric_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer.best_metric='acuracy' is not an eval metric of toy.*score"):
        run(tmp_path, [0.1] * 5, best_metric="acuracy")
