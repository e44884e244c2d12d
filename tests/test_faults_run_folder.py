"""One run per output folder; output folders that cannot be used; empty config files.

Each fault ends in one line that names the folder (or file) and the reason, exit status 2, and no
write to the folder; a crashed run's lock never blocks the next run."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multissl import cli
from multissl.errors import OutputError
from multissl.run_lock import LOCK_FILE, claim, refuse_if_in_use
from tests.conftest import BIN, ROOT, run
from tests.toy import Toy, toy_data

HOLDER = """
import os, sys
from multissl.run_lock import claim
lock = claim(sys.argv[1])
if len(sys.argv) > 2:  # a forked child that outlives us, as a DataLoader worker can
    child = os.fork()
    if child == 0:
        import time
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
print("ready", flush=True)
sys.stdin.read()
"""


def hold(folder: Path, fork_child: bool = False) -> tuple[subprocess.Popen, int | None]:
    """A process (not this one) that claims ``folder`` and keeps it until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), *(["fork"] if fork_child else [])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    child = int(proc.stdout.readline()) if fork_child else None
    assert proc.stdout.readline().strip() == "ready"
    return proc, child


def stop(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=30)


def claim_elsewhere(folder: Path) -> subprocess.CompletedProcess:
    """Try to claim ``folder`` from another process; exit 0 when it got it, 2 with the error else."""
    code = ("import sys\nfrom multissl.run_lock import claim\nfrom multissl.errors import OutputError\n"
            "try:\n    claim(sys.argv[1]).release()\nexcept OutputError as e:\n    print(e); sys.exit(2)\n")
    return run([sys.executable, "-c", code, str(folder)], timeout=60)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def in_use_prefix(folder: Path, pid: int) -> str:
    return f"{folder} is in use by another run (pid {pid} on {socket.gethostname()}, started "


# ----------------------------------------------------------------------------- two runs, one folder
def test_second_run_refuses_while_the_first_trains(tmp_path: Path) -> None:
    """The issue's reproduction: the same command twice on one folder. The second exits 2 with one
    line naming the folder and the first's process, and writes nothing; the first goes on with its
    files untouched and logs every step once."""
    out = tmp_path / "run"
    args = [str(BIN / "multissl"), "pretrain", "mlm", f"trainer.output_dir={out}", "trainer.max_steps=5000",
            "trainer.save_every=10", "trainer.log_every=1", "trainer.eval_every=0", "trainer.progress_bar=false",
            "trainer.trackers=[]", "trainer.batch_size=8", "data.vocab_size=300", "data.max_seq_len=32",
            "model.hidden_size=32", "model.intermediate_size=64"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.1)
        kept = {p: p.read_bytes() for p in [out / "config.yaml", *sorted((out / "tokenizer").iterdir())]}
        second = run(args, timeout=120, OMP_NUM_THREADS="1")
        assert first.poll() is None, "the first run was still training when the second one looked"
        assert second.returncode == 2, second.stderr[-2000:]
        lines = error_lines(second.stderr)
        assert len(lines) == 1 and lines[0].startswith(f"multissl: error: {in_use_prefix(out, first.pid)}"), lines
        assert "multissl pretrain mlm trainer.output_dir=" in second.stderr, "names the other run's command"
        assert "wait for it, stop it, or use another trainer.output_dir" in second.stderr
        assert {p: p.read_bytes() for p in kept} == kept, "the first run's config and tokenizer untouched"
    finally:
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err[-2000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)), "each step logged once, by the first run only"
    assert list((out / "checkpoints").glob("step_*")), "the first run's checkpoint is there"


def test_refusal_under_torchrun_does_not_hang(tmp_path: Path) -> None:
    """Only rank 0 takes the lock; every rank learns the refusal and exits 2 instead of waiting."""
    holder, _ = hold(tmp_path)
    try:
        start = time.time()
        proc = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "recipes/mlm.py", f"trainer.output_dir={tmp_path}",
                    "trainer.progress_bar=false", "trainer.trackers=[]"], timeout=180,
                   ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    finally:
        stop(holder)
    assert proc.returncode != 0 and time.time() - start < 120
    refusals = [line for line in proc.stderr.splitlines() if line.startswith("multissl: error: ")]
    assert len(refusals) == 2 and all(in_use_prefix(tmp_path, holder.pid) in line for line in refusals), proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    # Both processes raise the refusal and exit 2; the first to exit is torchrun's root cause, and torchrun
    # may SIGTERM the other while it is still on its way out (-15). No process may abort (-6) or crash.
    codes = re.findall(r"exitcode\s*: (-?\d+)", proc.stderr)
    assert codes and codes[-1] == "2" and set(codes) <= {"2", "-15"}, codes
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_lock_of_a_killed_run_does_not_block(tmp_path: Path) -> None:
    """kill -9 leaves the lock file (with the dead run's details) but not the lock, even while a
    child the dead run forked (a DataLoader worker) still lives."""
    holder, child = hold(tmp_path, fork_child=True)
    try:
        refused = claim_elsewhere(tmp_path)
        assert refused.returncode == 2 and in_use_prefix(tmp_path, holder.pid) in refused.stdout, refused.stdout
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid, "stale details stay"
        os.kill(child, 0)  # the forked child is still alive
        with claim(tmp_path) as lock:
            assert lock.held
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
            refused = claim_elsewhere(tmp_path)
            assert refused.returncode == 2 and in_use_prefix(tmp_path, os.getpid()) in refused.stdout
        assert claim_elsewhere(tmp_path).returncode == 0, "released on leaving the with block"
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)


# ------------------------------------------------------------------------------------------- push
def test_push_refuses_a_folder_in_use(tmp_path: Path) -> None:
    """Before any network: the run's folder and its model folder are both refused while it runs."""
    holder, _ = hold(tmp_path)
    env = {"HF_TOKEN": "hf_test", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_XET": "1"}
    try:
        for target in (tmp_path, tmp_path / "model"):
            proc = run([str(BIN / "multissl"), "push", str(target), "--repo-id", "me/model"], timeout=60, **env)
            assert proc.returncode == 2, proc.stderr
            lines = error_lines(proc.stderr)
            assert len(lines) == 1 and lines[0].startswith(f"multissl: error: {in_use_prefix(tmp_path, holder.pid)}")
            assert lines[0].endswith("; wait for it to finish, then push")
    finally:
        stop(holder)
    after = run([str(BIN / "multissl"), "push", str(tmp_path), "--repo-id", "me/model"], timeout=60, **env)
    assert after.returncode == 2 and "in use" not in after.stderr and "no model in" in after.stderr, after.stderr


def test_push_from_the_run_s_own_process_is_not_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``hub.push=true`` pushes from the process that holds the lock: that is not "another run"."""
    with claim(tmp_path):
        refuse_if_in_use(tmp_path)
        assert cli.main(["push", str(tmp_path), "--repo-id", "me/model", "--token", "hf_test"]) == 2
    err = capsys.readouterr().err
    assert "in use" not in err and "no model in" in err, err


# ------------------------------------------------------------------------------ unusable folders
def _can_create_in(folder: Path) -> bool:
    probe = folder / ".write-probe"
    try:
        probe.touch()
    except OSError:
        return False
    probe.unlink()
    return True


def _unwritable_folder(tmp_path: Path) -> Path:
    """An existing folder this process cannot write: chmod 0o500 for a normal user; root ignores
    modes, so as root a sysfs folder, where the kernel refuses new files even to root."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    if not _can_create_in(folder):
        return folder
    folder.chmod(0o700)
    folder.rmdir()
    assert os.geteuid() == 0 and not _can_create_in(Path("/sys/kernel")), "only root writes a 0o500 folder"
    return Path("/sys/kernel")


@pytest.mark.parametrize("kind", ["file", "under_a_file", "dev_null", "proc", "read_only"])
def test_unusable_output_folder_is_one_line(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("keep me\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    path, reason = {
        "file": (tmp_path / "notes.txt", "it is a file"),
        "under_a_file": (tmp_path / "notes.txt" / "run", f"{tmp_path / 'notes.txt'} is a file"),
        "dev_null": (Path("/dev/null"), "it is not a folder (a device or other special file)"),
        "proc": (Path("/proc/multissl-run"), "cannot create a folder in /proc (No such file or directory)"),
        "read_only": (None, ""),
    }[kind]
    if kind == "read_only":
        path = _unwritable_folder(tmp_path)
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        listing = sorted(os.listdir(path))
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["pretrain", "mlm", f"trainer.output_dir={path}"])
        assert exit_.value.code == 2
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"multissl: error: output folder {path} cannot be used: "), lines[0]
        assert lines[0].endswith("; use another trainer.output_dir"), lines[0]
        if reason:
            assert f"cannot be used: {reason};" in lines[0], lines[0]
        else:
            assert "not writable" in lines[0] or "read-only" in lines[0], lines[0]
            assert sorted(os.listdir(path)) == listing, "nothing written into it"
    finally:
        if kind == "read_only" and path.is_relative_to(tmp_path):
            path.chmod(0o700)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "nothing created"
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"
    assert not Path("/proc/multissl-run").exists()


def test_demo_folder_is_checked_first(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("")
    assert cli.main(["demo", "--output-dir", str(tmp_path / "notes.txt")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines == [f"multissl: error: output folder {tmp_path / 'notes.txt'} cannot be used: it is a file; "
                     "use another --output-dir"], lines


# ------------------------------------------------------------------------------- empty config files
@pytest.mark.parametrize("text", ["", "  \n\n\t\n", "# nothing set yet\n"], ids=["empty", "blank", "comments"])
def test_empty_config_file_is_an_error(tmp_path: Path, text: str, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text(text)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["pretrain", "mlm", "--config", str(config), f"trainer.output_dir={out}"])
    assert exit_.value.code == 2
    assert error_lines(capsys.readouterr().err) == [
        f"multissl: error: config file {config} is empty (it sets no keys); put config keys in it, "
        "or leave out --config to run the recipe's preset"]
    assert not out.exists() and not (Path.cwd() / "outputs" / "mlm" / LOCK_FILE).exists()


def test_binary_config_file_is_one_line(tmp_path: Path) -> None:
    from multissl import config
    from multissl.errors import ConfigError
    from multissl.training.config import TrainerConfig

    config_file = tmp_path / "weights.yaml"
    config_file.write_bytes(b"\x80\x04\x95binary")
    with pytest.raises(ConfigError, match=r"weights.yaml: not a YAML text file \(byte 0 is not UTF-8\)$"):
        config.build(TrainerConfig, config_file)


def test_explicit_empty_mapping_is_accepted(tmp_path: Path) -> None:
    """``{}`` says "the defaults" on purpose; only a file that says nothing at all is refused."""
    from multissl import config
    from multissl.training.config import TrainerConfig

    config_file = tmp_path / "defaults.yaml"
    config_file.write_text("{}\n")
    assert config.build(TrainerConfig, config_file) == TrainerConfig()


# ---------------------------------------------------------------- trainers one after another, one process
def _fit(out: Path, **kw: object):
    from multissl.training.trainer import Trainer, TrainerConfig

    cfg = TrainerConfig(**{"output_dir": str(out), "max_steps": 4, "batch_size": 16, "log_every": 2,
                           "progress_bar": False, "trackers": [], **kw})
    data = toy_data(64)
    return Trainer(cfg).fit(Toy(), data[:48], data[48:])


def test_trainers_one_after_another_in_one_process(tmp_path: Path) -> None:
    """The demo and notebooks run trainers one after another on one folder: a finished fit frees it
    (for other processes too); a trainer that never finished is taken over by the next one here,
    and still keeps other processes out while it is alive."""
    from multissl.training.trainer import Trainer, TrainerConfig

    first = _fit(tmp_path)
    assert claim_elsewhere(tmp_path).returncode == 0, "released at the end of fit"
    again = _fit(tmp_path)
    assert again.state.step == first.state.step == 4
    stuck = Trainer(TrainerConfig(output_dir=str(tmp_path), progress_bar=False, trackers=[]))  # never fitted
    refused = claim_elsewhere(tmp_path)
    assert refused.returncode == 2 and in_use_prefix(tmp_path, os.getpid()) in refused.stdout
    assert _fit(tmp_path, max_steps=6).state.step == 6, "the next trainer of this process takes the folder over"
    assert claim_elsewhere(tmp_path).returncode == 0
    del stuck  # the taken-over trainer gives nothing back twice
    assert claim_elsewhere(tmp_path).returncode == 0


def test_claim_errors_are_output_errors(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match=r"cannot be used: .*f is a file; use another --out$"):
        claim(tmp_path / "f" / "sub", option="--out")
