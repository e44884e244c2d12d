"""scripts/bench_clip.py's shared evaluator scores the model it is handed, in both sides' formats (issue 16:
equal quality numbers on both sides were a coincidence of two similar models on 305 pairs, not a fixed model)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import bench_clip  # noqa: E402


def _init(seed: int) -> torch.nn.Module:
    from multissl.objectives.clip import ClipLossConfig, ClipModelConfig, build_clip

    torch.manual_seed(seed)
    return build_clip(ClipModelConfig(name=bench_clip.MODEL), ClipLossConfig())[0]


def _as_open_clip_train(model: torch.nn.Module, path: Path) -> Path:
    """What open_clip_train writes at the end of an epoch (epoch, name, state_dict, optimizer)."""
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save({"epoch": 1, "name": "run", "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    return path


def test_evaluator_scores_the_checkpoint_it_is_given(tmp_path: Path) -> None:
    from multissl.objectives.clip import ClipEvalConfig, ClipLossConfig, ClipModelConfig, ClipPretraining

    a, b = _init(0), _init(1)
    ours = ClipPretraining(ClipModelConfig(name=bench_clip.MODEL), ClipLossConfig(), ClipEvalConfig(), lambda *x: None)
    ours.save_pretrained(a, tmp_path / "model")  # our side's exported folder
    theirs = bench_clip.evaluate(_as_open_clip_train(a, tmp_path / "a.pt"))
    # the same weights score the same whichever side's format holds them
    assert bench_clip.evaluate(tmp_path / "model") == theirs
    # other weights score otherwise: nothing fixed is loaded in place of the given checkpoint
    assert bench_clip.evaluate(_as_open_clip_train(b, tmp_path / "b.pt")) != theirs
    # a's image tower with b's text tower: zero-shot and retrieval use the text tower too
    hybrid = _init(0)
    hybrid.load_state_dict({k: v for k, v in b.state_dict().items() if not k.startswith("visual.")}, strict=False)
    torch.testing.assert_close(hybrid.visual.state_dict(), a.visual.state_dict())
    mixed = bench_clip.evaluate(_as_open_clip_train(hybrid, tmp_path / "hybrid.pt"))
    assert mixed["zero_shot_top1"] != theirs["zero_shot_top1"] or mixed["zero_shot_top5"] != theirs["zero_shot_top5"]
