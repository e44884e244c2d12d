"""Shared fixtures: offline mode, quiet libraries, one CPU thread budget."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # torchrun, multissl and friends of this environment
FREE_PORT = ["--main_process_port", "0"]
"""For every ``accelerate launch`` a test starts: a free port, since ``make test`` runs two at a time
and both would otherwise take accelerate's default."""
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ACCELERATE_USE_CPU", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def _quiet() -> None:
    from multissl.cli import quiet_libraries

    quiet_libraries()


def tiny_args(out: Path, steps: int = 20, **extra: object) -> list[str]:
    """Overrides that make a recipe's tiny preset run in seconds."""
    args = [
        f"trainer.output_dir={out}", f"trainer.max_steps={steps}", "trainer.batch_size=16",
        "trainer.log_every=5", "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress_bar=false",
        "trainer.trackers=[]", "trainer.eval_max_batches=4", "data.vocab_size=1000", "data.max_seq_len=64",
        "model.hidden_size=64", "model.intermediate_size=128",
    ]
    args += [f"{k}={v}" for k, v in extra.items()]
    return args


def run(args: list[str], timeout: int = 300, **env: str | None) -> subprocess.CompletedProcess:
    """A command from the repository root, offline, with the package importable; a variable given
    as None is left out (as on a user's machine, where nothing sets ``ACCELERATE_USE_CPU``)."""
    merged = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **env}
    full_env = {k: v for k, v in merged.items() if v is not None}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=full_env)


def assert_resume_is_exact(main: Any, args: list[str], out: Path, steps: int) -> Any:
    """Run ``main(args)`` straight to ``steps``; drop the last checkpoint and the model, as a kill
    right after the previous checkpoint would; run again (it resumes) and check that the weights and
    every logged loss match the straight run. Returns the resumed run's result."""
    import shutil

    import torch

    from multissl.metrics import read_jsonl

    straight = main(args)
    want = {k: v.clone() for k, v in straight.model.state_dict().items()}
    rows = read_jsonl(out / "metrics.jsonl")
    shutil.rmtree(out / "checkpoints" / f"step_{steps:08d}")
    shutil.rmtree(out / "model")
    resumed = main(args)
    assert resumed.state.step == steps
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6, msg=name)
    key = lambda rs: [(r["step"], round(r.get("train/loss", r.get("eval/loss", 0)), 5)) for r in rs]  # noqa: E731
    assert key(read_jsonl(out / "metrics.jsonl")) == key(rows)
    return resumed


@pytest.fixture(scope="session")
def ddp_mlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MLM under DDP on 2 CPU processes (``tests.test_sharding.MLM``): the run that compiled, sharded
    and DeepSpeed runs of the same command are held to, step for step. Made once a session."""
    from tests.test_sharding import MLM, _torchrun

    out = tmp_path_factory.mktemp("ddp_mlm") / "run"
    proc = _torchrun(MLM, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
