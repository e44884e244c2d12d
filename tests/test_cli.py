"""The command line as a user meets it: one-line errors, the script entry, several processes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, ROOT, run


@pytest.mark.parametrize(("extra", "needle"), [
    (["trainer.lrr=1"], "unknown config key 'trainer.lrr'; did you mean 'lr'?"),
    (["trainer.max_steps=many"], "trainer.max_steps: expected an integer, got 'many'"),
    (["data.files=[/no/such/corpus.txt]"], "data.files: no such file or folder: /no/such/corpus.txt"),
    (["--config", "/no/such.yaml"], "config file not found: /no/such.yaml"),
])
def test_bad_input_is_one_line(tmp_path: Path, extra: list[str], needle: str) -> None:
    proc = run([str(BIN / "multissl"), "pretrain", "mlm", f"trainer.output_dir={tmp_path}", *extra])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"multissl: error: {needle}"], proc.stderr


def test_unknown_recipe(tmp_path: Path) -> None:
    proc = run([str(BIN / "multissl"), "pretrain", "mlmm"])
    assert proc.returncode == 2 and "unknown recipe 'mlmm' (did you mean 'mlm'?)" in proc.stderr


@pytest.mark.parametrize("fails", ["bad input", "interrupt"])
def test_an_error_line_is_one_write(monkeypatch: pytest.MonkeyPatch, fails: str) -> None:
    """Under torchrun every process prints the same refusal into one pipe: the line and its newline
    go out in one write, so no process's line can land inside another's (CI saw two lines glued
    together when print wrote the newline separately)."""
    import sys

    from multissl.cli import run_recipe
    from multissl.errors import ConfigError, TrainingInterrupted

    writes: list[str] = []
    stream = type("Recorder", (), {"write": lambda self, text: writes.append(text) or len(text), "flush": lambda self: None})()
    monkeypatch.setattr(sys, "stderr", stream)

    def main(_argv: list[str] | None) -> None:
        raise ConfigError("the folder is in use") if fails == "bad input" else TrainingInterrupted("interrupted at step 3")

    with pytest.raises(SystemExit) as leaving:
        run_recipe(main, [])
    assert leaving.value.code == (2 if fails == "bad input" else 130)
    assert len(writes) == 1 and writes[0].startswith("multissl: ") and writes[0].endswith("\n"), writes
    assert writes[0].count("\n") == 1


def test_script_entry_and_sigint_resume(tmp_path: Path) -> None:
    """`python recipes/clm.py` runs; SIGINT saves a checkpoint and exits 130; rerunning resumes."""
    import signal
    import time

    args = [str(BIN / "python"), "recipes/clm.py", f"trainer.output_dir={tmp_path}", "trainer.max_steps=400",
            "trainer.progress_bar=false", "trainer.log_every=1", "trainer.trackers=[]", "data.vocab_size=500",
            "model.hidden_size=32", "data.max_seq_len=32", "trainer.batch_size=4"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "checkpoint saved to" in err and "Run the same command again to resume" in err
    saved = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert len(saved) == 1
    step = json.loads((saved[0] / "trainer_state.json").read_text())["step"]
    assert 0 < step < 400
    done = run(args[:4] + ["trainer.max_steps=" + str(step + 3)] + args[5:])
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {saved[0]}" in done.stdout
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, step + 4)), "no gap, no duplicate"
    assert (tmp_path / "model" / "config.json").is_file()


def test_two_processes(tmp_path: Path) -> None:
    """MLM under torchrun with 2 CPU processes (gloo): one set of files, metrics once per step."""
    proc = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "recipes/mlm.py", f"trainer.output_dir={tmp_path}",
                "trainer.max_steps=6", "trainer.log_every=2", "trainer.save_every=3", "trainer.progress_bar=false",
                "trainer.trackers=[]", "data.vocab_size=500", "model.hidden_size=32", "trainer.batch_size=8",
                # one eval batch in all: process 1 gets none and must still join the metric reduction
                "trainer.eval_batch_size=100000", "trainer.eval_every=3"],
               timeout=600, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == [2, 4, 6], "each step logged once, by rank 0"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    ckpt = tmp_path / "checkpoints" / "step_00000006"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert len(state["rank_positions"]) == 2, "each process's data position is kept"
    assert state["seen"]["samples"] == 6 * 8 * 2, "samples counted over both processes"
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6] and all(r["eval/loss"] > 0 for r in evals)
    assert all(r["throughput/samples_per_s"] > 0 for r in rows if "train/loss" in r)
    from transformers import AutoModelForMaskedLM

    AutoModelForMaskedLM.from_pretrained(tmp_path / "model")


def test_two_processes_streaming_resume_is_exact(tmp_path: Path) -> None:
    """Streamed shards under 2 processes: a resume from the middle checkpoint ends with the same weights."""
    import shutil

    from safetensors.torch import load_file

    from multissl.data.demo import python_doc_paragraphs

    # Two files of very different sizes: each process streams one, so their epochs drift apart.
    paragraphs = python_doc_paragraphs()
    big, small = tmp_path / "a_big.jsonl", tmp_path / "b_small.jsonl"
    big.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in paragraphs[:400]))
    small.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in paragraphs[400:403]))
    out = tmp_path / "run"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "recipes/clm.py", f"trainer.output_dir={out}",
           f"data.files=[{big}, {small}]", "data.streaming=true", "trainer.max_steps=8", "trainer.save_every=4",
           "trainer.keep_last=3", "trainer.progress_bar=false", "trainer.trackers=[]", "data.vocab_size=300",
           "model.hidden_size=32", "data.max_seq_len=32", "trainer.batch_size=4", "trainer.eval_max_batches=2",
           "model.dropout=0.1"]
    first = run(cmd, timeout=600, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    assert first.returncode == 0, first.stderr[-3000:]
    want = load_file(out / "model" / "model.safetensors")
    shutil.rmtree(out / "checkpoints" / "step_00000008")
    shutil.rmtree(out / "model")
    again = run(cmd, timeout=600, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout
    positions = json.loads((out / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())["rank_positions"]
    assert positions[0] != positions[1], "the test needs processes at different data positions"
    got = load_file(out / "model" / "model.safetensors")
    import torch

    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_demo_runs_every_recipe_and_prints_the_table(tmp_path: Path) -> None:
    """`make demo`'s command, cut to 2 steps a recipe."""
    proc = run([str(BIN / "multissl"), "demo", "--steps", "2", "--output-dir", str(tmp_path)], timeout=900,
               OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("Results on the held-out split"):]
    model_files = {"mlm": ["config.json"], "clm": ["config.json"], "wav2vec2": ["config.json"],
                   "clip": ["open_clip_config.json", "open_clip_model.safetensors"],
                   "simclr": ["config.json", "model.safetensors"],
                   "mae": ["config.json", "model.safetensors", "preprocessor_config.json", "reconstructions.png"]}
    for name, files in model_files.items():
        assert all((tmp_path / name / "model" / f).is_file() for f in files), name
        row = next(line.split() for line in table.splitlines() if line.split()[:1] == [name])
        assert all(float(v) > 0 for v in row[1:3]), row  # eval losses before and after
    clip = next(line.split() for line in table.splitlines() if line.split()[:1] == ["clip"])
    assert all(0.0 <= float(v) <= 1.0 for v in clip[3:5]), clip  # zero-shot top-1 before and after
    assert clip[-1] == "samples/s" and float(clip[-2].replace(",", "")) > 0, clip
    assert "audio-seconds/s" in table
    assert f"clip model: {tmp_path / 'clip' / 'model'}  (loads with open_clip's create_model_and_transforms" in table
    assert "held-out image->text R@1 " in table
    assert "frozen features on held-out digits: linear probe " in table
    # the lift reports: a text, a speech and an image task, both arms at 10% and 100% of the labels
    for task in ("text-classification", "audio-classification", "image-classification"):
        assert f"SSL lift on {task}" in table
        report = json.loads((tmp_path / f"lift-{task}" / "lift.json").read_text())
        assert len(report["runs"]) == 4 and (tmp_path / f"lift-{task}" / "lift.png").is_file()
