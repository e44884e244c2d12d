"""Shared fixtures: offline mode, quiet libraries, one CPU thread budget."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # torchrun, multissl and friends of this environment
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ACCELERATE_USE_CPU", "1")
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


def run(args: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """A command from the repository root, offline, with the package importable."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=full_env)
