"""The trainer's host-memory setting: freed training memory stays mapped instead of faulting back in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from multissl.training.host_malloc import is_glibc, why_not_tuned

ROOT = Path(__file__).resolve().parents[1]
GLIBC = is_glibc()

# Starts from a malloc that hands freed memory back at once (blocks above 128 KiB mapped and unmapped,
# the heap trimmed on every free: glibc's defaults do that or not depending on where long-lived
# objects sit, so they are no stable yardstick), fits the toy objective with trainer.keep_host_memory
# as given, then repeats a step-like pattern (eight 12 MiB buffers made and freed) and prints the
# minor page faults the repeats took.
_CHILD = """
import ctypes, json, resource, sys, tempfile
import torch
from multissl.training.host_malloc import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
from multissl.training.trainer import Trainer, TrainerConfig
from tests.toy import Toy, toy_data

mallopt = ctypes.CDLL(None).mallopt
assert mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1 and mallopt(M_TRIM_THRESHOLD, 0) == 1
torch.set_num_threads(1)
keep = sys.argv[1] == "1"
cfg = TrainerConfig(output_dir=tempfile.mkdtemp(), max_steps=2, batch_size=8, progress_bar=False, trackers=[],
                    cpu=True, keep_host_memory=keep)
data = toy_data(64)
Trainer(cfg).fit(Toy(), data, None)

def step():
    held = [torch.ones(3 * 2**20) for _ in range(8)]
    del held

for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print("FAULTS " + json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def _faults_after_fit(keep: bool) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, "1" if keep else "0"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("FAULTS "))
    return json.loads(line.removeprefix("FAULTS "))


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc thresholds; other C libraries are left alone")
def test_training_on_cpu_keeps_freed_memory_mapped() -> None:
    # 10 repeats of 96 MiB made and freed: handed back, every repeat faults its 24k pages in again;
    # with the trainer's setting (which overrides the start's) the pages stay mapped and are reused.
    untouched, kept = _faults_after_fit(False), _faults_after_fit(True)
    assert untouched > 10 * 20_000, f"the pattern should fault when memory is handed back; got {untouched}"
    assert kept < untouched / 20, (kept, untouched)


def test_users_allocator_choices_are_respected() -> None:
    clean = {"PATH": "/usr/bin"}
    assert why_not_tuned(clean) == ("" if GLIBC else "not glibc")
    if GLIBC:
        assert "MALLOC_TRIM_THRESHOLD_" in why_not_tuned({"MALLOC_TRIM_THRESHOLD_": "0"})
        assert "GLIBC_TUNABLES" in why_not_tuned({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
        assert why_not_tuned({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}) == ""
        assert "jemalloc" in why_not_tuned({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
