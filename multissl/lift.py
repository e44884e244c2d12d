"""The SSL-lift report: what pretraining buys on a downstream task.

For each share of the training labels, a task is fine-tuned twice with the same seeds, steps and
settings: (a) from the pretrained output, (b) from the same architecture and tokenizer with random
weights. Where the task has a classical baseline (`multissl.baselines`), it is fitted on the same
training examples and scored on the same held-out split, as a third column. The report (``lift.md``,
``lift.json``, ``lift.png`` in the output folder) gives the held-out headline metric of each and the
lift with its spread over seeds, and says per fraction whether the lift is larger than that spread.
Each run evaluates once, at its last step, so neither side is picked by its eval score.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from multissl.baselines import BASELINES
from multissl.config import read_yaml
from multissl.errors import ConfigError
from multissl.registry import find
from multissl.run_lock import claim

ARMS = {"pretrained": "false", "from scratch": "true"}  # arm -> model.random_init
BASELINE = "baseline"
"""The arm name of a task's classical baseline runs (not fine-tuned: no model.random_init)."""

HELPED, HURT = "pretraining helped", "pretraining hurt"
NO_DIFFERENCE, ONE_SEED = "no measured difference", "one seed"


@dataclass
class LiftRun:
    arm: str
    fraction: float
    seed: int
    metric: float
    train_size: int | None
    output_dir: str


@dataclass
class FractionSummary:
    """One fraction's numbers as lift.json gives them; stds are None with one seed."""

    fraction: float
    train_size: int | None
    seeds: int
    means: dict[str, float]
    stds: dict[str, float | None]
    lift: float
    lift_std: float | None
    verdict: str
    """`HELPED`, `HURT`, `NO_DIFFERENCE` or `ONE_SEED`."""
    verdict_line: str


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def judge(lift: float, lift_std: float | None, arm_stds: list[float | None]) -> str:
    """A lift counts only when it is larger than its own spread over seeds and than either arm's
    spread: a paired difference can look steady while both arms swing by more from seed to seed."""
    if lift_std is None:
        return ONE_SEED
    noise = max([lift_std, *(s for s in arm_stds if s is not None)])
    if abs(lift) <= noise:
        return NO_DIFFERENCE
    return HELPED if lift > 0 else HURT


def percent(fraction: float) -> str:
    return f"{fraction:.0%}" if fraction >= 0.01 else f"{fraction:.1%}"


@dataclass
class LiftReport:
    task: str
    pretrained: str
    metric: str
    runs: list[LiftRun] = field(default_factory=list)
    lower_is_better: bool = False
    """As the task's objective says of its headline metric."""
    baseline: str = ""
    """The classical baseline's name when the task has one (its runs have arm `BASELINE`)."""

    def arms(self) -> list[str]:
        """The fine-tuned arms, then the baseline when it ran."""
        return [*ARMS, BASELINE] if any(r.arm == BASELINE for r in self.runs) else list(ARMS)

    def fractions(self) -> list[float]:
        return sorted({r.fraction for r in self.runs})

    def values(self, arm: str, fraction: float) -> list[float]:
        return [r.metric for r in self.runs if r.arm == arm and r.fraction == fraction]

    def train_size(self, fraction: float) -> int | None:
        return next((r.train_size for r in self.runs if r.fraction == fraction), None)

    def paired_lifts(self, fraction: float) -> list[float]:
        """Per seed, pretrained minus from-scratch (same seed, hence the same training subset), signed
        so that positive means pretraining helped."""
        pre, scratch = ({r.seed: r.metric for r in self.runs if r.arm == arm and r.fraction == fraction} for arm in ARMS)
        diffs = [pre[s] - scratch[s] for s in sorted(pre.keys() & scratch.keys())]
        return [-d for d in diffs] if self.lower_is_better else diffs

    def lift(self, fraction: float) -> float:
        """The mean paired lift: positive means pretraining helped."""
        return statistics.fmean(self.paired_lifts(fraction))

    def lift_std(self, fraction: float) -> float | None:
        """The standard deviation over seeds of the paired lifts; None with one seed."""
        return _std(self.paired_lifts(fraction))

    def verdict(self, fraction: float) -> str:
        return judge(self.lift(fraction), self.lift_std(fraction), [_std(self.values(a, fraction)) for a in ARMS])

    def verdict_line(self, fraction: float) -> str:
        head, verdict = f"{percent(fraction)} of the labels: lift", self.verdict(fraction)
        lift, spread = self.lift(fraction), self.lift_std(fraction)
        if verdict == ONE_SEED:
            return f"{head} {lift:+.3f}, one seed: no spread, run --seeds 0,1,2 to tell a lift from noise"
        said = f"within the spread: {verdict}" if verdict == NO_DIFFERENCE else f"larger than the spread ({verdict})"
        return f"{head} {lift:+.3f} ± {spread:.3f} over {len(self.paired_lifts(fraction))} seeds: {said}"

    def summary(self, fraction: float) -> FractionSummary:
        return FractionSummary(
            fraction, self.train_size(fraction), len(self.paired_lifts(fraction)),
            {a: statistics.fmean(self.values(a, fraction)) for a in self.arms()},
            {a: _std(self.values(a, fraction)) for a in self.arms()},
            self.lift(fraction), self.lift_std(fraction), self.verdict(fraction), self.verdict_line(fraction))


def _summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def _lift_cell(report: LiftReport, fraction: float) -> str:
    spread = report.lift_std(fraction)
    return f"{report.lift(fraction):+.3f}" + (f" ± {spread:.3f}" if spread is not None else "")


def _rows(report: LiftReport) -> list[list[str]]:
    """Per fraction: labels used, training examples, one cell per arm, lift ± spread."""
    rows = []
    for f in report.fractions():
        n = report.train_size(f)
        cells = [_summary(report.values(a, f)) for a in report.arms()]
        rows.append([percent(f), str(n if n is not None else "-"), *cells, _lift_cell(report, f)])
    return rows


def markdown(report: LiftReport) -> str:
    seeds = sorted({r.seed for r in report.runs})
    better = "lower" if report.lower_is_better else "higher"
    arms = ["pretrained", "from scratch"] + ([f"{report.baseline} (baseline)"] if BASELINE in report.arms() else [])
    baseline = (f" The baseline column is a classical model ({report.baseline}) fitted on the same training "
                "examples and scored on the same held-out split: what pretraining has to beat to pay off."
                if BASELINE in report.arms() else "")
    lines = [
        f"# SSL lift: {report.task}",
        "",
        f"Held-out **{report.metric}** ({better} is better) after fine-tuning from the pretrained model "
        f"`{report.pretrained}` and from the same architecture with random weights; same steps, settings "
        f"and seeds ({', '.join(map(str, seeds))}){'; mean ± standard deviation over seeds' if len(seeds) > 1 else ''}. "
        "Lift = how much pretraining improved the metric, ± the standard deviation over seeds of the "
        "per-seed differences (pretrained minus from scratch with the same seed and training examples). "
        "A lift counts only when it is larger than that spread and than either arm's spread." + baseline,
        "",
        "| labels used | training examples | " + " | ".join(arms) + " | lift ± spread |",
        "|---:|---:|" + "---:|" * len(arms) + "---:|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(report)]
    lines += ["", *(f"- {report.verdict_line(f)}" for f in report.fractions())]
    lines += ["", "![held-out metric against the share of labels used](lift.png)", ""]
    return "\n".join(lines)


def print_table(report: LiftReport) -> None:
    header = ["labels", "examples", "pretrained", "from scratch"] + (["baseline"] if BASELINE in report.arms() else [])
    rows = [[*header, "lift ± spread"], *_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\nSSL lift on {report.task}: held-out {report.metric} "
          f"({'lower' if report.lower_is_better else 'higher'} is better)")
    if BASELINE in report.arms():
        print(f"  baseline: {report.baseline}, on the same training examples")
    for i, row in enumerate(rows):
        print("  " + "  ".join(v.rjust(w) for v, w in zip(row, widths)))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    for f in report.fractions():
        print(f"  {report.verdict_line(f)}")


def _label(report: LiftReport, arm: str) -> str:
    return f"baseline: {report.baseline}" if arm == BASELINE else arm


def write_report(report: LiftReport, output_dir: Path) -> Path:
    from multissl.plots import lift_plot

    output_dir.mkdir(parents=True, exist_ok=True)
    points = {}
    for arm in report.arms():
        series = []
        for f in report.fractions():
            vals = report.values(arm, f)
            series.append((f, statistics.fmean(vals), _std(vals) or 0.0))
        points[_label(report, arm)] = series
    lift_plot(points, report.metric, f"{report.task}: pretrained vs from scratch", output_dir / "lift.png",
              dashed=[_label(report, BASELINE)])
    (output_dir / "lift.json").write_text(json.dumps({
        "task": report.task, "pretrained": report.pretrained, "metric": report.metric,
        "lower_is_better": report.lower_is_better, "baseline": report.baseline,
        "runs": [asdict(r) for r in report.runs if r.arm in ARMS],
        "baseline_runs": [asdict(r) for r in report.runs if r.arm == BASELINE],
        "summary": [asdict(report.summary(f)) for f in report.fractions()],
    }, indent=1), encoding="utf-8")
    path = output_dir / "lift.md"
    path.write_text(markdown(report), encoding="utf-8")
    return path


def run_baseline(report: LiftReport, fraction: float, seed: int, run_dir: Path) -> None:
    """Fit the task's classical baseline on the training subset of the fine-tuning run in ``run_dir``
    (read from the config its trainer saved, so every setting and override is the run's own)."""
    baseline = BASELINES.get(report.task)
    if baseline is None:
        return
    run_config = read_yaml(run_dir / "config.yaml")
    result = baseline(run_config)
    if report.metric not in result.metrics:
        print(f"note: the {result.name} baseline has no {report.metric!r}; no baseline column", flush=True)
        return
    if run_config.get("trainer", {}).get("eval_max_batches"):
        print("note: trainer.eval_max_batches caps the fine-tuned runs' eval; the baseline scores the whole "
              "eval split", flush=True)
    report.baseline = result.name
    report.runs.append(LiftRun(BASELINE, fraction, seed, result.metrics[report.metric], result.train_size, ""))
    print(f"{result.name}: {report.metric} {result.metrics[report.metric]:.3f} "
          f"on {result.train_size} training examples", flush=True)


def run_lift(task: str, pretrained: str, output_dir: str | Path, fractions: list[float], seeds: list[int],
             args: list[str] | None = None) -> LiftReport:
    """Fine-tune ``task`` for every (fraction, seed, arm), and fit its baseline on the same subset;
    each fine-tuning run has its own folder under ``output_dir/runs``, so an interrupted report
    resumes where it stopped (baselines take seconds and are refitted)."""
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
                run_dirs = []
                for arm, random_init in ARMS.items():
                    run_dir = out / "runs" / f"{arm.replace(' ', '-')}_labels{fraction:g}_seed{seed}"
                    print(f"\n== {task}: {arm}, {fraction:.0%} of the labels, seed {seed} ==", flush=True)
                    result = main([*(args or []), f"model.init_from={pretrained}", f"model.random_init={random_init}",
                                  f"data.label_fraction={fraction}", f"data.subset_seed={seed}",
                                  f"trainer.seed={seed}", f"trainer.output_dir={run_dir}", "trainer.eval_every=0"])
                    report.metric, report.lower_is_better = result.best_metric, result.lower_is_better
                    report.runs.append(LiftRun(arm, fraction, seed, result.final_metrics[result.best_metric],
                                               result.train_size, str(run_dir)))
                    run_dirs.append(run_dir)
                run_baseline(report, fraction, seed, run_dirs[0])
        write_report(report, out)
    return report
