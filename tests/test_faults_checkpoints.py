"""Faults while a run writes its outputs: kill -9 at a step and inside each file of a checkpoint
(model, optimizer, RNG states, the objective's state, trainer_state.json), and a full disk while
writing a checkpoint or the final model. Re-running the same command resumes from the newest
complete checkpoint and ends with the losses and weights of a run that never failed.

The faults happen in a child process that runs the toy objective through the CLI's
``run_recipe``; this module is also that child (``python -m tests.test_faults_checkpoints OUT
FAULT``), which patches the writers (``torch.save``, Accelerate's safetensors writer, the
trainer's state file) so that the chosen file is written half, then the process is SIGKILLed or
the write fails with ENOSPC.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from multissl import full_disk
from multissl.errors import OutputError
from multissl.metrics import read_jsonl
from multissl.training.trainer import Trainer, TrainerConfig, list_checkpoints
from tests.conftest import BIN, run
from tests.toy import Toy, toy_data

STEPS, SAVE_EVERY = 12, 4
CHECKPOINT_FILES = ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl",
                    "trainer_state.json"]
"""What a checkpoint of the toy objective holds, in the order it is written (no LR scheduler is
registered with Accelerate: the schedules are functions of the step, saved in trainer_state.json)."""
PARTIAL_8 = ".partial-step_00000008"


def trainer_config(out: Path) -> TrainerConfig:
    return TrainerConfig(output_dir=str(out), max_steps=STEPS, save_every=SAVE_EVERY, batch_size=16, lr=1e-2,
                         log_every=1, eval_every=6, progress_bar=False, trackers=[], seed=7, warmup_steps=2)


def train(out: Path, hook: Any = None):
    data = toy_data()
    return Trainer(trainer_config(out)).fit(Toy(hook=hook), data[:224], data[224:])


# --------------------------------------------------------------------------------- the child process
def _tear(path: Path, data: bytes, kind: str) -> None:
    """Write the first half of ``data`` to ``path``, then die or fail as a full disk would."""
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _install_fault(kind: str, name: str, folder: str) -> None:
    """Make the write of ``folder/name`` (folder: the name of the folder it is written in) fail."""
    import accelerate.utils.other as accelerate_io
    import safetensors.torch

    from multissl.training import trainer

    def hit(f: Any) -> bool:
        return isinstance(f, (str, os.PathLike)) and Path(f).name == name and Path(f).parent.name == folder

    real_torch_save, real_safe_save, real_write_state = torch.save, accelerate_io.safe_save_file, trainer._write_state

    def torch_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if hit(f):
            buffer = io.BytesIO()
            real_torch_save(obj, buffer, *args, **kwargs)
            _tear(Path(f), buffer.getvalue(), kind)
        real_torch_save(obj, f, *args, **kwargs)

    def safe_save(tensors: dict[str, torch.Tensor], filename: Any, metadata: dict[str, str] | None = None) -> None:
        if hit(filename):
            _tear(Path(filename), safetensors.torch.save(tensors, metadata=metadata), kind)
        real_safe_save(tensors, filename, metadata=metadata)

    def write_state(path: Path, state: Any) -> None:
        if hit(path):
            buffer = io.StringIO()
            import json

            json.dump(state.__dict__, buffer, indent=1)
            _tear(path, buffer.getvalue().encode(), kind)
        real_write_state(path, state)

    torch.save = torch_save
    accelerate_io.safe_save_file = safe_save
    trainer._write_state = write_state


def child(argv: list[str]) -> None:
    """``OUT [kill-at-step:N | kill:FILE@FOLDER | enospc:FILE@FOLDER]``"""
    from multissl.cli import run_recipe

    out, fault = Path(argv[0]), argv[1] if len(argv) > 1 else ""
    hook = None
    if fault.startswith("kill-at-step:"):
        at = int(fault.split(":", 1)[1])

        def hook(step: int) -> None:
            if step == at:
                os.kill(os.getpid(), signal.SIGKILL)
    elif fault:
        kind, target = fault.split(":", 1)
        name, folder = target.split("@", 1)
        _install_fault(kind, name, folder)
    run_recipe(lambda _argv: train(out, hook), [])


def run_child(out: Path, fault: str = "", timeout: int = 120):
    return run([sys.executable, "-m", "tests.test_faults_checkpoints", str(out), fault], timeout=timeout,
               OMP_NUM_THREADS="1")


# ------------------------------------------------------------------------------------------- checks
@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The run that never failed: its logged losses and its final weights."""
    out = tmp_path_factory.mktemp("straight")
    result = train(out)
    return {"rows": _losses(out), "weights": {k: v.clone() for k, v in result.model.state_dict().items()}}


def _losses(out: Path) -> list[tuple[int, float | None, float | None]]:
    rows = read_jsonl(out / "metrics.jsonl")
    return [(r["step"], r.get("train/loss"), r.get("eval/loss")) for r in rows]


def assert_same_as_straight(out: Path, weights: dict[str, torch.Tensor], straight: dict[str, Any]) -> None:
    assert _losses(out) == straight["rows"], "every step's loss, logged once"
    assert weights.keys() == straight["weights"].keys()
    for name, value in weights.items():
        assert torch.equal(value, straight["weights"][name]), name
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")], "no partial folder left"


def _names(out: Path) -> list[str]:
    return [p.name for p in list_checkpoints(out)]


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_kill_while_writing_each_checkpoint_file_then_rerun_is_exact(tmp_path: Path, straight: dict[str, Any],
                                                                     name: str) -> None:
    out = tmp_path / "run"
    proc = run_child(out, f"kill:{name}@{PARTIAL_8}")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    torn = out / "checkpoints" / PARTIAL_8 / name
    assert torn.is_file() and torn.stat().st_size > 0, "killed half-way through this file"
    torn_size = torn.stat().st_size
    assert _names(out) == ["step_00000004"], "the half-written checkpoint is never taken for one"
    assert not (out / "model").exists()

    result = train(out)  # the same run again: it resumes from step 4
    assert result.state.step == STEPS
    assert_same_as_straight(out, result.model.state_dict(), straight)
    assert _names(out) == ["step_00000008", "step_00000012"]
    assert (out / "checkpoints" / "step_00000008" / name).stat().st_size > torn_size, "written whole this time"


@pytest.mark.parametrize("step", [3, 6])
def test_kill_at_a_step_then_rerun_is_exact(tmp_path: Path, straight: dict[str, Any], step: int) -> None:
    """Before the first checkpoint (the re-run starts over), and between two."""
    out = tmp_path / "run"
    proc = run_child(out, f"kill-at-step:{step}")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert _names(out) == [f"step_{s:08d}" for s in range(SAVE_EVERY, step, SAVE_EVERY)][-2:]
    assert max(r[0] for r in _losses(out)) == step - 1, "metrics were written up to the kill"
    result = train(out)
    assert_same_as_straight(out, result.model.state_dict(), straight)


@pytest.mark.parametrize(("name", "folder"), [("optimizer.bin", PARTIAL_8), ("model.safetensors", PARTIAL_8),
                                              ("toy.pt", ".model.partial")],
                         ids=["optimizer", "weights", "final-model"])
def test_a_full_disk_is_one_line_and_the_same_command_resumes(tmp_path: Path, straight: dict[str, Any],
                                                              name: str, folder: str) -> None:
    out = tmp_path / "run"
    proc = run_child(out, f"enospc:{name}@{folder}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    final = folder == ".model.partial"
    newest = out / "checkpoints" / ("step_00000012" if final else "step_00000004")
    partial = out / folder if final else out / "checkpoints" / folder
    assert _one_error_line(proc.stderr) == (
        f"multissl: error: no space left on device while writing {partial / name}; the newest complete checkpoint "
        f"{newest} is intact: free space and run the same command again to resume")
    assert not partial.exists(), "the half-written folder is removed"
    assert list_checkpoints(out)[-1] == newest and not (out / "model").exists()

    again = run_child(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {newest}" in again.stdout
    assert_same_as_straight(out, torch.load(out / "model" / "toy.pt"), straight)


def test_a_full_disk_on_one_process_stops_both(tmp_path: Path) -> None:
    """Under torchrun with 2 processes, rank 1 runs out of space writing its own RNG states while
    rank 0 waits for it: both stop at once with the same line (neither hangs at the barrier), and
    the older checkpoint is left for the re-run."""
    out = tmp_path / "run"
    proc = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "tests.test_faults_checkpoints",
                str(out), f"enospc:random_states_1.pkl@{PARTIAL_8}"], timeout=180, OMP_NUM_THREADS="1")
    assert proc.returncode != 0
    want = (f"multissl: error: no space left on device while writing {out / 'checkpoints' / PARTIAL_8 / 'random_states_1.pkl'}; "
            f"the newest complete checkpoint {out / 'checkpoints' / 'step_00000004'} is intact")
    assert proc.stderr.count(want) == 2, proc.stderr[-3000:]
    assert _names(out) == ["step_00000004"] and not (out / "checkpoints" / PARTIAL_8).exists()


# --------------------------------------------------------------------------------- telling the disk
def test_only_a_full_disk_is_taken_for_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import SafetensorError

    assert full_disk.is_out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert full_disk.is_out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not full_disk.is_out_of_space(PermissionError(errno.EACCES, "Permission denied"))
    wrapped = RuntimeError("could not save")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert full_disk.is_out_of_space(wrapped)
    assert full_disk.is_out_of_space(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    with pytest.raises(RuntimeError, match="inline_container.cc.*unexpected pos") as torch_error:
        torch.save({"w": torch.randn(100_000)}, _FullDisk())
    assert full_disk.is_out_of_space(torch_error.value), "written to a file object, the OSError is kept as the context"
    # written to a path, torch.save says only this (what the run printed): the disk is checked
    bare = RuntimeError(str(torch_error.value))
    assert not full_disk.is_out_of_space(bare, tmp_path), "this disk has room: not a full disk"
    assert not full_disk.is_out_of_space(bare), "nowhere to check: not taken for a full disk"
    assert not full_disk.is_out_of_space(RuntimeError("CUDA out of memory"), tmp_path)
    monkeypatch.setattr(full_disk.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 4096})())
    assert full_disk.is_out_of_space(bare, tmp_path / "not" / "made" / "yet")
    assert not full_disk.is_out_of_space(RuntimeError("CUDA out of memory"), tmp_path), "only torch's writer is checked"

    log = tmp_path / "metrics.jsonl"
    with pytest.raises(OutputError) as full, full_disk.no_space_as_output_error(log):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(full.value) == (f"no space left on device while writing {log}; free space and run the same command "
                               "again (it resumes from the newest complete checkpoint, if any)")
    with pytest.raises(PermissionError), full_disk.no_space_as_output_error(log):
        raise PermissionError(errno.EACCES, "Permission denied")



def test_a_full_disk_while_logging_metrics_is_one_line_and_keeps_the_old_lines(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """metrics.jsonl: an append that hits ENOSPC is an OutputError naming it, and the rewrite on resume
    (truncate_after) goes through a temporary file, so a full disk there keeps every old line."""
    from multissl.metrics import JsonlWriter

    log = JsonlWriter(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.write({"step": step, "train/loss": 1.0 / step})
    before = log.path.read_text(encoding="utf-8")
    real_open = Path.open

    def full(self: Path, *args, **kwargs):
        if self.parent == tmp_path and "w" in (args[0] if args else kwargs.get("mode", "r")) or (
                args and args[0] == "a"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(OutputError, match=f"no space left on device while writing {log.path}"):
        log.write({"step": 4, "train/loss": 0.2})
    with pytest.raises(OutputError, match="no space left on device"):
        log.truncate_after(2)
    monkeypatch.undo()
    assert log.path.read_text(encoding="utf-8") == before
    assert not list(tmp_path.glob(".*partial"))

class _FullDisk(io.RawIOBase):
    """A file that takes 1 kB, then fails as a full disk does."""

    def __init__(self) -> None:
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.written > 1000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return len(data)

if __name__ == "__main__":
    child(sys.argv[1:])
