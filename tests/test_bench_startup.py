"""scripts/bench_startup.py (issue 16: start-up measured): ``multissl --help`` does not import torch, and
a recipe's first run reports the trainer's start-up times in order."""

from __future__ import annotations

import os
import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import bench_startup  # noqa: E402


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_help_does_not_import_torch() -> None:
    run = bench_startup.help_run(_env())
    assert run["ok"] and run["torch_imported"] is False and 0 < run["seconds"] < 60


def test_a_recipe_reports_its_start_up_in_order() -> None:
    run = bench_startup.recipe_run("simclr", _env())
    assert 0 < run["before_fit_s"] < run["first_step_s"] < run["wall_s"]
