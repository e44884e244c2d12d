"""What `multissl demo` asks of each recipe: the preset, shortened only where the demo says so."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from multissl import demo


def _record(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    calls: dict[str, list[str]] = {}

    def find(kind: str, name: str) -> SimpleNamespace:
        def main(args: list[str]) -> SimpleNamespace:
            calls[name] = args
            return SimpleNamespace(history=[], final_metrics={})
        return SimpleNamespace(main=main)

    monkeypatch.setattr(demo, "find", find)
    return calls


def test_demo_runs_presets_and_shortens_only_clm_and_mae(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    calls = _record(monkeypatch)
    demo.demo_pretraining(str(tmp_path), None, ["mlm", "clm", "simclr", "mae"])
    assert calls["mlm"] == [f"trainer.output_dir={tmp_path / 'mlm'}"], "the MLM preset runs as it is"
    assert calls["simclr"] == [f"trainer.output_dir={tmp_path / 'simclr'}"], "the lifted image model: its preset"
    assert calls["clm"] == [f"trainer.output_dir={tmp_path / 'clm'}", "trainer.max_steps=150"]
    assert calls["mae"] == [f"trainer.output_dir={tmp_path / 'mae'}", "trainer.max_steps=150"]
    out = capsys.readouterr().out
    assert "== clm: tiny preset, 150 steps on the embedded text corpus ==" in out
    assert "== mae: tiny preset, 150 steps on the embedded MNIST digits ==" in out


def test_demo_steps_flag_applies_to_every_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _record(monkeypatch)
    demo.demo_pretraining(str(tmp_path), 2, ["mlm", "clm"])
    assert all(args[-1] == "trainer.max_steps=2" and len(args) == 2 for args in calls.values())
