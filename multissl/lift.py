"""The SSL-lift report: what pretraining buys on a downstream task.

For each share of the training labels, a task is fine-tuned twice with the same seeds, steps and
settings: (a) from the pretrained output, (b) from the same architecture and tokenizer with random
weights. The report (``lift.md``, ``lift.json``, ``lift.png`` in the output folder) gives the
held-out headline metric of both and the difference. Each run evaluates once, at its last step,
so neither side is picked by its eval score.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from multissl.errors import ConfigError
from multissl.registry import find
from multissl.run_lock import claim

ARMS = {"pretrained": "false", "from scratch": "true"}  # arm -> model.random_init


@dataclass
class LiftRun:
    arm: str
    fraction: float
    seed: int
    metric: float
    train_size: int | None
    output_dir: str


@dataclass
class LiftReport:
    task: str
    pretrained: str
    metric: str
    runs: list[LiftRun] = field(default_factory=list)
    lower_is_better: bool = False
    """As the task's objective says of its headline metric."""

    def fractions(self) -> list[float]:
        return sorted({r.fraction for r in self.runs})

    def values(self, arm: str, fraction: float) -> list[float]:
        return [r.metric for r in self.runs if r.arm == arm and r.fraction == fraction]

    def train_size(self, fraction: float) -> int | None:
        return next((r.train_size for r in self.runs if r.fraction == fraction), None)

    def lift(self, fraction: float) -> float:
        """Pretrained minus from-scratch, signed so that positive means pretraining helped."""
        diff = statistics.fmean(self.values("pretrained", fraction)) - statistics.fmean(self.values("from scratch", fraction))
        return -diff if self.lower_is_better else diff


def _summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def markdown(report: LiftReport) -> str:
    seeds = sorted({r.seed for r in report.runs})
    better = "lower" if report.lower_is_better else "higher"
    lines = [
        f"# SSL lift: {report.task}",
        "",
        f"Held-out **{report.metric}** ({better} is better) after fine-tuning from the pretrained model "
        f"`{report.pretrained}` and from the same architecture with random weights; same steps, settings "
        f"and seeds ({', '.join(map(str, seeds))}){'; mean ± standard deviation over seeds' if len(seeds) > 1 else ''}. "
        "Lift = how much pretraining improved the metric.",
        "",
        "| labels used | training examples | pretrained | from scratch | lift |",
        "|---:|---:|---:|---:|---:|",
    ]
    for f in report.fractions():
        n = report.train_size(f)
        lines.append(f"| {f:.0%} | {n if n is not None else '-'} | {_summary(report.values('pretrained', f))} | "
                     f"{_summary(report.values('from scratch', f))} | {report.lift(f):+.3f} |")
    lines += ["", "![held-out metric against the share of labels used](lift.png)", ""]
    return "\n".join(lines)


def print_table(report: LiftReport) -> None:
    rows = [["labels", "examples", "pretrained", "from scratch", "lift"]]
    for f in report.fractions():
        n = report.train_size(f)
        rows.append([f"{f:.0%}", str(n if n is not None else "-"), _summary(report.values("pretrained", f)),
                     _summary(report.values("from scratch", f)), f"{report.lift(f):+.3f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\nSSL lift on {report.task}: held-out {report.metric} "
          f"({'lower' if report.lower_is_better else 'higher'} is better)")
    for i, row in enumerate(rows):
        print("  " + "  ".join(v.rjust(w) for v, w in zip(row, widths)))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def write_report(report: LiftReport, output_dir: Path) -> Path:
    from multissl.plots import lift_plot

    output_dir.mkdir(parents=True, exist_ok=True)
    points = {}
    for arm in ARMS:
        series = []
        for f in report.fractions():
            vals = report.values(arm, f)
            series.append((f, statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0))
        points[arm] = series
    lift_plot(points, report.metric, f"{report.task}: pretrained vs from scratch", output_dir / "lift.png")
    (output_dir / "lift.json").write_text(json.dumps({
        "task": report.task, "pretrained": report.pretrained, "metric": report.metric,
        "lower_is_better": report.lower_is_better, "runs": [r.__dict__ for r in report.runs],
    }, indent=1), encoding="utf-8")
    path = output_dir / "lift.md"
    path.write_text(markdown(report), encoding="utf-8")
    return path


def run_lift(task: str, pretrained: str, output_dir: str | Path, fractions: list[float], seeds: list[int],
             args: list[str] | None = None) -> LiftReport:
    """Fine-tune ``task`` for every (fraction, seed, arm); each run has its own folder under
    ``output_dir/runs``, so an interrupted report resumes where it stopped."""
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ConfigError(f"label fractions must be in (0, 1], got {fractions}")
    if not seeds:
        raise ConfigError("give at least one seed")
    main = find("finetune", task).main
    out = Path(output_dir)
    report = LiftReport(task, pretrained, "")
    with claim(out, "--output-dir"):  # one lift per folder; its runs' folders are locked by their trainers
        for fraction in sorted(fractions):
            for seed in seeds:
                for arm, random_init in ARMS.items():
                    run_dir = out / "runs" / f"{arm.replace(' ', '-')}_labels{fraction:g}_seed{seed}"
                    print(f"\n== {task}: {arm}, {fraction:.0%} of the labels, seed {seed} ==", flush=True)
                    result = main([*(args or []), f"model.init_from={pretrained}", f"model.random_init={random_init}",
                                  f"data.label_fraction={fraction}", f"data.subset_seed={seed}",
                                  f"trainer.seed={seed}", f"trainer.output_dir={run_dir}", "trainer.eval_every=0"])
                    report.metric, report.lower_is_better = result.best_metric, result.lower_is_better
                    report.runs.append(LiftRun(arm, fraction, seed, result.final_metrics[result.best_metric],
                                               result.train_size, str(run_dir)))
        write_report(report, out)
    return report
