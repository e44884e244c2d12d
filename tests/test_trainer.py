"""The trainer on a toy objective: learning, accumulation, non-finite steps, checkpoints, resume."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from multissl.callbacks import ModelCardCallback
from multissl.errors import TrainingError, TrainingInterrupted
from multissl.metrics import read_jsonl
from multissl.training.trainer import Trainer, TrainerConfig, list_checkpoints
from tests.toy import Toy, ToyCollator, toy_data


def cfg(out: Path, **kw: object) -> TrainerConfig:
    base = dict(output_dir=str(out), max_steps=40, batch_size=16, lr=1e-2, log_every=5, progress_bar=False,
                trackers=[], seed=7, warmup_steps=5)
    base.update(kw)
    return TrainerConfig(**base)


def fit(out: Path, objective_kw: dict | None = None, **kw: object):
    trainer = Trainer(cfg(out, **kw), callbacks=[ModelCardCallback()])
    toy = Toy(**(objective_kw or {}))
    data = toy_data()
    return trainer.fit(toy, data[:224], data[224:]), toy


def test_loss_falls_and_outputs_written(tmp_path: Path) -> None:
    result, _ = fit(tmp_path, max_steps=60, eval_every=20)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert train[-1] < 0.3 * train[0]
    assert len(evals) == 4 and evals[-1] < 0.3 * evals[0], "eval at step 0, 20, 40, 60"
    assert all(r["step"] <= 60 for r in rows)
    assert {"train/lr", "train/grad_norm", "throughput/samples_per_s"} <= set(rows[1])
    assert (tmp_path / "model" / "toy.pt").is_file() and (tmp_path / "model" / "README.md").is_file()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000060"]
    assert result.state.seen["samples"] == 60 * 16


def test_eval_loss_is_sample_weighted(tmp_path: Path) -> None:
    # 32 eval samples in batches of 12, 12, 8: a per-batch average would weight the last batch too much.
    trainer = Trainer(cfg(tmp_path, max_steps=1, eval_batch_size=12, lr=0.0, warmup_steps=0))
    toy, data = Toy(), toy_data()
    result = trainer.fit(toy, data[:224], data[224:])
    model = toy.model.eval()
    x = torch.stack([d["x"] for d in data[224:]])
    y = torch.stack([d["y"] for d in data[224:]])
    with torch.no_grad():
        expected = ((model(x).squeeze(-1) - y) ** 2).mean().item()
    assert result.final_metrics["loss"] == pytest.approx(expected, rel=1e-4)


def test_grad_accumulation_matches_big_batch(tmp_path: Path) -> None:
    """Two micro-batches of 16 accumulate the gradient of one batch of 32 (no dropout or input noise,
    so the two runs differ only in how the batch is split)."""
    kw = {"dropout": 0.0, "noise": 0.0}
    a, toy_a = fit(tmp_path / "a", kw, max_steps=3, batch_size=32, grad_accum_steps=1, max_grad_norm=0.0)
    b, toy_b = fit(tmp_path / "b", kw, max_steps=3, batch_size=16, grad_accum_steps=2, max_grad_norm=0.0)
    assert b.state.seen["samples"] == a.state.seen["samples"] == 96
    assert len(toy_a.grads) == len(toy_b.grads) == 3
    for step, (ga, gb) in enumerate(zip(toy_a.grads, toy_b.grads)):
        assert ga.keys() == gb.keys()
        for name in ga:
            torch.testing.assert_close(gb[name], ga[name], rtol=1e-5, atol=1e-7, msg=f"step {step}: {name}")


def test_nonfinite_step_is_skipped_and_counted(tmp_path: Path) -> None:
    """Step 3's loss is NaN: its update is skipped whole (no NaN step, and no momentum or weight-decay
    step on zeroed gradients either), so the weights after it are those after step 2, to the bit."""
    weights: dict[int, dict[str, torch.Tensor]] = {}
    toy = Toy(nan_at_steps={3})

    def keep(step: int) -> None:  # called at each step's end, after the update (or the skip)
        weights[step] = {k: v.detach().clone() for k, v in toy.model.state_dict().items()}

    toy.hook = keep
    data = toy_data()
    result = Trainer(cfg(tmp_path, max_steps=10)).fit(toy, data[:224], data[224:])
    assert result.state.nonfinite_total == 1
    assert sorted(weights) == list(range(1, 11))
    for name, before in weights[2].items():
        assert torch.equal(weights[3][name], before), f"{name} moved in the skipped step"
    assert any(not torch.equal(weights[4][k], weights[3][k]) for k in weights[3]), "training goes on after it"
    assert any(not torch.equal(weights[2][k], weights[1][k]) for k in weights[1]), "steps before it trained"
    assert all(torch.isfinite(p).all() for p in toy.model.parameters())


def test_repeated_nonfinite_stops_with_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="non-finite for 3 steps in a row"):
        fit(tmp_path, {"nan_at_steps": {2, 3, 4, 5}}, max_steps=10, max_nonfinite_steps=3)


def test_keeps_last_k_checkpoints_and_ignores_partial(tmp_path: Path) -> None:
    fit(tmp_path, max_steps=20, save_every=5, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000015", "step_00000020"]
    # A crash mid-write leaves a folder without trainer_state.json: it is never taken as latest.
    broken = tmp_path / "checkpoints" / "step_00000025"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"torn")
    assert list_checkpoints(tmp_path)[-1].name == "step_00000020"


def _interrupt_at(step: int):
    def hook(s: int) -> None:
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


def test_sigterm_saves_and_resume_is_exact(tmp_path: Path) -> None:
    straight, toy_a = fit(tmp_path / "a", max_steps=30, eval_every=10)
    with pytest.raises(TrainingInterrupted, match="step 13/30"):
        fit(tmp_path / "b", {"hook": _interrupt_at(13)}, max_steps=30, eval_every=10)
    assert list_checkpoints(tmp_path / "b")[-1].name == "step_00000013"
    resumed, toy_b = fit(tmp_path / "b", max_steps=30, eval_every=10)
    assert resumed.state.step == 30 and toy_b.steps_done == 30, "objective state restored"
    for pa, pb in zip(toy_a.model.parameters(), toy_b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    rows_a = [r for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")]
    rows_b = [r for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")]
    keys = ("train/loss", "eval/loss", "train/lr", "train/grad_norm")
    strip = lambda rows: [(r["step"], *(round(r[k], 6) for k in keys if k in r)) for r in rows]  # noqa: E731
    assert strip(rows_b) == strip(rows_a), "same losses, logged once per step"


def test_resume_with_workers_is_exact(tmp_path: Path) -> None:
    _, toy_a = fit(tmp_path / "a", max_steps=12, num_workers=2)
    with pytest.raises(TrainingInterrupted):
        fit(tmp_path / "b", {"hook": _interrupt_at(5)}, max_steps=12, num_workers=2)
    _, toy_b = fit(tmp_path / "b", max_steps=12, num_workers=0)
    for pa, pb in zip(toy_a.model.parameters(), toy_b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_checkpoint_state_file(tmp_path: Path) -> None:
    fit(tmp_path, max_steps=14, save_every=7)
    state = json.loads((tmp_path / "checkpoints" / "step_00000014" / "trainer_state.json").read_text())
    assert state["step"] == 14 and state["seen"]["samples"] == 14 * 16
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 14), "224 samples / 16 = 14 batches an epoch"


def test_refuses_to_mix_runs_without_resume(tmp_path: Path) -> None:
    from multissl.errors import ConfigError

    fit(tmp_path, max_steps=4)
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run"):
        fit(tmp_path, max_steps=4, resume=False)
    assert list_checkpoints(tmp_path), "earlier work untouched"


def test_rerun_of_finished_run_reexports(tmp_path: Path) -> None:
    first, _ = fit(tmp_path, max_steps=4)
    again, _ = fit(tmp_path, max_steps=4)
    assert again.state.step == 4 and again.final_metrics["loss"] == pytest.approx(first.final_metrics["loss"])


def test_epochs_set_the_step_count(tmp_path: Path) -> None:
    result, _ = fit(tmp_path, max_steps=0, epochs=2.0, grad_accum_steps=2)
    # 224 samples / 16 a batch = 14 batches an epoch; 2 epochs / 2 micro-batches a step = 14 steps
    assert result.state.step == 14 and result.state.seen["samples"] == 2 * 224


class _SlowCollator(ToyCollator):
    """Collation that takes 30 ms a batch: a starved input pipeline."""

    def __call__(self, samples, generator):  # type: ignore[no-untyped-def]
        import time

        time.sleep(0.03)
        return super().__call__(samples, generator)


class _SlowData(Toy):
    def collator(self) -> ToyCollator:
        return _SlowCollator(noise=self.noise)


class _SlowStep(Toy):
    def compute(self, model, batch):  # type: ignore[no-untyped-def]
        import time

        time.sleep(0.03)
        return super().compute(model, batch)


@pytest.mark.parametrize("objective, starved", [(_SlowData, True), (_SlowStep, False)])
def test_perf_metrics_tell_a_starved_input_pipeline(tmp_path: Path, objective: type, starved: bool) -> None:
    """perf/data_fraction is the share of step time spent waiting for batches, perf/step_seconds the
    step time, both from the steps themselves: an evaluation in the window does not count."""
    trainer = Trainer(cfg(tmp_path, max_steps=10, eval_every=3, num_workers=0))
    data = toy_data()
    trainer.fit(objective(), data[:224], data[224:])
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "perf/step_seconds" in r]
    assert [r["step"] for r in rows] == [5, 10]
    for r in rows:
        assert 0.03 <= r["perf/step_seconds"] < 0.5
        assert (r["perf/data_fraction"] > 0.7) if starved else (r["perf/data_fraction"] < 0.3), r


def test_startup_times_are_logged_once_on_the_first_training_record(tmp_path: Path) -> None:
    """Seconds from process start to fit and to the end of the first step (which here sleeps 0.03 s,
    after an evaluation at step 0), on the first training record only."""
    trainer = Trainer(cfg(tmp_path, max_steps=10, eval_every=5, num_workers=0))
    data = toy_data()
    trainer.fit(_SlowStep(), data[:224], data[224:])
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    with_startup = [r for r in rows if "perf/startup_seconds" in r]
    assert [r["step"] for r in with_startup] == [rows[0]["step"]] and all("perf/before_fit_seconds" not in r
                                                                           for r in rows[1:])
    first = with_startup[0]
    assert 0 < first["perf/before_fit_seconds"] < first["perf/startup_seconds"] - 0.03


def test_checkpoints_and_model_are_on_disk_before_they_are_renamed_into_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file of a checkpoint (and of the exported model) is fsynced before the rename that makes
    it the newest, and the parent folder after it: a power cut cannot leave it empty."""
    events: list[tuple[str, str]] = []
    renamed: dict[str, list[str]] = {}  # what each renamed folder held at the rename
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: object, dst: object) -> None:
        events.append(("replace", f"{src} -> {dst}"))
        renamed[str(dst)] = [str(p) for p in Path(str(src)).rglob("*")]
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    fit(tmp_path, max_steps=4, save_every=2, eval_every=0)
    out = tmp_path.resolve()
    for final in [out / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000004", out / "model"]:
        tmp = final.parent / (f".partial-{final.name}" if final.parent.name == "checkpoints" else ".model.partial")
        at = events.index(("replace", f"{tmp} -> {final}"))
        synced = {path for kind, path in events[:at] if kind == "fsync"}
        files = renamed[str(final)]
        assert files and all(f in synced for f in files), [f for f in files if f not in synced]
        assert str(tmp) in synced
        assert ("fsync", str(final.parent)) in events[at + 1:], "the rename itself is flushed"


def test_compiled_training_matches_eager_and_resumes(tmp_path: Path) -> None:
    """``compile=True`` on one process: the eager run's losses and weights (no dropout, so the two
    runs differ only in kernels); a checkpoint written from the compiled model resumes into one, and
    the exported model is the plain one (no ``_orig_mod.`` in its keys)."""
    kw = {"dropout": 0.0}
    eager, toy_e = fit(tmp_path / "eager", kw, max_steps=12, eval_every=6, log_every=1)
    with pytest.raises(TrainingInterrupted):
        fit(tmp_path / "compiled", {**kw, "hook": _interrupt_at(5)}, max_steps=12, eval_every=6, log_every=1,
            compile=True)
    resumed, toy_c = fit(tmp_path / "compiled", kw, max_steps=12, eval_every=6, log_every=1, compile=True)
    assert resumed.state.step == 12
    for pa, pb in zip(toy_e.model.parameters(), toy_c.model.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)
    losses = lambda out: [(r["step"], r["train/loss"]) for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]  # noqa: E731
    for (sa, la), (sb, lb) in zip(losses(tmp_path / "eager"), losses(tmp_path / "compiled"), strict=True):
        assert sa == sb and lb == pytest.approx(la, rel=1e-5)
    exported = torch.load(tmp_path / "compiled" / "model" / "toy.pt")
    assert not any("_orig_mod" in k for k in exported), sorted(exported)[:3]
