"""The SSL-lift report: both arms and the classical baseline at every fraction and seed, the lift's
spread over seeds and its verdict, a table, a plot, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from multissl_recipes import mlm
from PIL import Image

from multissl.baselines import BASELINES, tfidf_logistic_regression
from multissl.cli import main as cli
from multissl.data.text_classification import TextClassificationDataConfig, load_labelled_text
from multissl.lift import HELPED, HURT, NO_DIFFERENCE, ONE_SEED, LiftReport, LiftRun, markdown, print_table
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
    # the classical baseline: same training examples as both fine-tuned arms, well above chance (5 topics)
    baseline = {r["fraction"]: r for r in report["baseline_runs"]}
    assert report["baseline"] == "TF-IDF + logistic regression" and sorted(baseline) == [0.05, 1.0]
    assert all(baseline[f]["train_size"] == sizes[f] and baseline[f]["seed"] == 0 for f in baseline)
    assert baseline[1.0]["metric"] > 0.6 and 0.0 < baseline[0.05]["metric"] < baseline[1.0]["metric"]
    summary = {s["fraction"]: s for s in report["summary"]}
    assert summary[1.0]["means"]["baseline"] == pytest.approx(baseline[1.0]["metric"])
    assert summary[1.0]["seeds"] == 1 and summary[1.0]["lift_std"] is None and summary[1.0]["verdict"] == "one seed"
    table = (out / "lift.md").read_text()
    assert "| 5% |" in table and "| 100% |" in table and "![" in table
    assert "| pretrained | from scratch | TF-IDF + logistic regression (baseline) | lift ± spread |" in table
    assert f"| {baseline[1.0]['metric']:.3f} |" in table
    pre = next(r["metric"] for r in runs if r["arm"] == "pretrained" and r["fraction"] == 1.0)
    scratch = next(r["metric"] for r in runs if r["arm"] == "from scratch" and r["fraction"] == 1.0)
    assert f"{pre - scratch:+.3f}" in table
    verdict = f"100% of the labels: lift {pre - scratch:+.3f}, one seed: no spread, run --seeds 0,1,2 to tell a lift from noise"
    assert f"- {verdict}" in table and "- 5% of the labels: lift " in table
    printed = capsys.readouterr().out
    assert "SSL lift on text-classification" in printed and str(out / "lift.md") in printed
    assert verdict in printed and "baseline: TF-IDF + logistic regression" in printed
    # the plot has all three curves: matplotlib's first three colours (C0 blue, C1 orange, C2 green)
    pixels = np.asarray(Image.open(out / "lift.png").convert("RGB")).reshape(-1, 3).astype(int)
    for colour in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):
        assert (np.abs(pixels - colour).sum(1) < 30).sum() > 50, colour


def test_markdown_signs_the_lift_for_error_rates() -> None:
    report = LiftReport("speech-recognition", "w2v", "cer", [
        LiftRun("pretrained", 1.0, 0, 0.4, 100, "a"), LiftRun("from scratch", 1.0, 0, 0.7, 100, "b"),
        LiftRun("pretrained", 1.0, 1, 0.5, 100, "c"), LiftRun("from scratch", 1.0, 1, 0.8, 100, "d"),
    ], lower_is_better=True)  # as the CTC objective says of cer
    table = markdown(report)
    assert "lower is better" in table
    assert "| 100% | 100 | 0.450 ± 0.071 | 0.750 ± 0.071 | +0.300 ± 0.000 |" in table
    assert "100% of the labels: lift +0.300 ± 0.000 over 2 seeds: larger than the spread (pretraining helped)" in table
    assert report.verdict(1.0) == HELPED


def test_bad_arguments_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["lift", "text-clasification", "--pretrained", str(tmp_path)]) == 2
    assert "did you mean 'text-classification'" in capsys.readouterr().err
    assert cli(["lift", "text-classification", "--pretrained", str(tmp_path), "--fractions", "0,1"]) == 2
    assert "label fractions must be in (0, 1]" in capsys.readouterr().err


def _report(pretrained: list[float], scratch: list[float], lower_is_better: bool = False) -> LiftReport:
    """A hand-made report at 10% of the labels, one run per seed and arm."""
    runs = [LiftRun(arm, 0.1, seed, value, 50, "")
            for arm, values in (("pretrained", pretrained), ("from scratch", scratch)) for seed, value in enumerate(values)]
    return LiftReport("text-classification", "mlm", "accuracy", runs, lower_is_better)


def test_one_seed_has_no_spread_and_no_verdict() -> None:
    report = _report([0.9], [0.5])
    s = report.summary(0.1)
    assert (s.seeds, s.lift, s.lift_std, s.verdict) == (1, pytest.approx(0.4), None, ONE_SEED)
    assert s.stds == {"pretrained": None, "from scratch": None}
    assert s.verdict_line == "10% of the labels: lift +0.400, one seed: no spread, run --seeds 0,1,2 to tell a lift from noise"
    assert "| 10% | 50 | 0.900 | 0.500 | +0.400 |" in markdown(report)


def test_lift_is_the_mean_of_paired_differences_with_their_spread() -> None:
    report = _report([0.62, 0.70, 0.66], [0.50, 0.55, 0.56])  # per seed: +0.12, +0.15, +0.10
    s = report.summary(0.1)
    assert s.lift == pytest.approx(0.12333, abs=1e-4) and s.lift_std == pytest.approx(0.02517, abs=1e-4)
    assert s.means["pretrained"] == pytest.approx(0.66) and s.stds["from scratch"] == pytest.approx(0.03215, abs=1e-4)
    assert s.verdict == HELPED
    assert s.verdict_line == "10% of the labels: lift +0.123 ± 0.025 over 3 seeds: larger than the spread (pretraining helped)"
    assert "| 10% | 50 | 0.660 ± 0.040 | 0.537 ± 0.032 | +0.123 ± 0.025 |" in markdown(report)


def test_a_lift_inside_the_spread_is_no_measured_difference() -> None:
    noisy = _report([0.70, 0.50, 0.62], [0.52, 0.60, 0.55])  # per seed: +0.18, -0.10, +0.07
    assert noisy.lift(0.1) == pytest.approx(0.05) and noisy.lift_std(0.1) > 0.1
    assert noisy.verdict(0.1) == NO_DIFFERENCE
    assert noisy.verdict_line(0.1).endswith("over 3 seeds: within the spread: no measured difference")
    # steady per-seed differences, but both arms swing by more than the lift from seed to seed
    swinging = _report([0.55, 0.75, 0.95], [0.50, 0.70, 0.90])
    assert swinging.lift_std(0.1) == pytest.approx(0.0, abs=1e-9) and swinging.verdict(0.1) == NO_DIFFERENCE


def test_lower_is_better_signs_lift_and_verdict() -> None:
    worse = _report([0.40, 0.42, 0.41], [0.30, 0.31, 0.30], lower_is_better=True)  # a higher error rate
    assert worse.lift(0.1) == pytest.approx(-0.10667, abs=1e-4) and worse.verdict(0.1) == HURT
    assert worse.verdict_line(0.1).endswith("larger than the spread (pretraining hurt)")
    better = _report([0.30, 0.31, 0.30], [0.40, 0.42, 0.41], lower_is_better=True)
    assert better.lift(0.1) > 0 and better.verdict(0.1) == HELPED


def test_report_files_with_a_baseline_and_one_seed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from multissl.lift import BASELINE, write_report

    report = _report([0.9], [0.5])
    report.runs += [LiftRun(BASELINE, 0.1, 0, 0.7, 50, ""), LiftRun("pretrained", 1.0, 0, 0.95, 500, ""),
                    LiftRun("from scratch", 1.0, 0, 0.8, 500, ""), LiftRun(BASELINE, 1.0, 0, 0.85, 500, "")]
    report.baseline = "TF-IDF + logistic regression"
    write_report(report, tmp_path)
    saved = json.loads((tmp_path / "lift.json").read_text())
    assert [r["arm"] for r in saved["runs"]] == ["pretrained", "from scratch", "pretrained", "from scratch"]
    assert [r["metric"] for r in saved["baseline_runs"]] == [0.7, 0.85]
    assert [s["verdict"] for s in saved["summary"]] == [ONE_SEED, ONE_SEED]
    assert saved["summary"][1]["means"] == {"pretrained": 0.95, "from scratch": 0.8, "baseline": 0.85}
    assert "| 100% | 500 | 0.950 | 0.800 | 0.850 | +0.150 |" in (tmp_path / "lift.md").read_text()
    assert Image.open(tmp_path / "lift.png").size == (600, 400)  # one seed: no error bars, still drawn
    print_table(report)
    printed = capsys.readouterr().out
    assert "lift ± spread" in printed and "0.850" in printed and "100% of the labels: lift +0.150, one seed" in printed


def test_baseline_fits_the_fine_tuning_subset() -> None:
    """The same rows load_labelled_text gives the fine-tuning run: same size, and other seeds other rows."""
    assert BASELINES["text-classification"] is tfidf_logistic_regression
    results = {}
    for seed in (0, 1):
        cfg = TextClassificationDataConfig(label_fraction=0.1, subset_seed=seed)
        results[seed] = tfidf_logistic_regression({"data": cfg.__dict__})
        assert results[seed].train_size == len(load_labelled_text(cfg).train)
    assert results[0].metrics["accuracy"] != results[1].metrics["accuracy"]  # the seed picks other training rows
    assert all(0.35 < r.metrics["accuracy"] < 1.0 and 0.0 < r.metrics["macro_f1"] <= 1.0 for r in results.values())
