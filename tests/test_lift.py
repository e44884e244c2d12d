"""The SSL-lift report: both arms at every fraction and seed, a table, a plot, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from multissl_recipes import mlm
from PIL import Image

from multissl.cli import main as cli
from multissl.lift import LiftReport, LiftRun, markdown
from tests.conftest import tiny_args


def test_report_runs_both_arms_at_each_fraction(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mlm.main(tiny_args(tmp_path / "mlm", steps=2))
    out = tmp_path / "lift"
    rc = cli(["lift", "text-classification", "--pretrained", str(tmp_path / "mlm"), "--fractions", "0.05,1",
              "--seeds", "0", "--output-dir", str(out), "trainer.max_steps=3", "trainer.batch_size=8",
              "trainer.progress_bar=false", "trainer.trackers=[]", "data.max_seq_len=32"])
    assert rc == 0
    report = json.loads((out / "lift.json").read_text())
    runs = report["runs"]
    assert report["metric"] == "accuracy" and not report["lower_is_better"]
    assert sorted((r["arm"], r["fraction"]) for r in runs) == [
        ("from scratch", 0.05), ("from scratch", 1.0), ("pretrained", 0.05), ("pretrained", 1.0)]
    sizes = {r["fraction"]: r["train_size"] for r in runs}
    assert sizes[0.05] < 0.07 * sizes[1.0] and sizes[1.0] > 1500  # the embedded topic task, stratified subsets
    for r in runs:
        assert (Path(r["output_dir"]) / "model" / "config.json").is_file()
        evals = [json.loads(line) for line in (Path(r["output_dir"]) / "metrics.jsonl").read_text().splitlines()
                 if "eval/accuracy" in line]
        assert [e["step"] for e in evals] == [3], "one evaluation, at the end: no arm is picked by its eval score"
        assert evals[0]["eval/accuracy"] == pytest.approx(r["metric"])
    table = (out / "lift.md").read_text()
    assert "| 5% |" in table and "| 100% |" in table and "![" in table
    pre = next(r["metric"] for r in runs if r["arm"] == "pretrained" and r["fraction"] == 1.0)
    scratch = next(r["metric"] for r in runs if r["arm"] == "from scratch" and r["fraction"] == 1.0)
    assert f"{pre - scratch:+.3f}" in table
    printed = capsys.readouterr().out
    assert "SSL lift on text-classification" in printed and str(out / "lift.md") in printed
    # the plot has both curves: matplotlib's first two colours (C0 blue, C1 orange) are both drawn
    pixels = np.asarray(Image.open(out / "lift.png").convert("RGB")).reshape(-1, 3).astype(int)
    for colour in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(pixels - colour).sum(1) < 30).sum() > 50, colour


def test_markdown_signs_the_lift_for_error_rates() -> None:
    report = LiftReport("speech-recognition", "w2v", "cer", [
        LiftRun("pretrained", 1.0, 0, 0.4, 100, "a"), LiftRun("from scratch", 1.0, 0, 0.7, 100, "b"),
        LiftRun("pretrained", 1.0, 1, 0.5, 100, "c"), LiftRun("from scratch", 1.0, 1, 0.8, 100, "d"),
    ], lower_is_better=True)  # as the CTC objective says of cer
    table = markdown(report)
    assert "lower is better" in table
    assert "| 100% | 100 | 0.450 ± 0.071 | 0.750 ± 0.071 | +0.300 |" in table


def test_bad_arguments_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["lift", "text-clasification", "--pretrained", str(tmp_path)]) == 2
    assert "did you mean 'text-classification'" in capsys.readouterr().err
    assert cli(["lift", "text-classification", "--pretrained", str(tmp_path), "--fractions", "0,1"]) == 2
    assert "label fractions must be in (0, 1]" in capsys.readouterr().err
