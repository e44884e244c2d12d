"""The CLIP objective: losses against naive references, cross-process negatives, eval metrics, export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from multissl.errors import ConfigError
from multissl.objectives.clip import (
    ClipEvalConfig,
    ClipLossConfig,
    ClipModelConfig,
    ClipPretraining,
    recall_at,
)
from tests.conftest import BIN, run
from tests.dist_clip_grads import build_objective, grads, half


def _naive_clip(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric cross-entropy over the similarity matrix, written out by hand."""
    n = image.shape[0]
    total = torch.zeros(())
    for i in range(n):
        row = [scale * float(image[i] @ text[j]) for j in range(n)]
        col = [scale * float(image[j] @ text[i]) for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        total += -(col[i] - math.log(sum(math.exp(v) for v in col)))
    return total / (2 * n)


def _naive_siglip(image: torch.Tensor, text: torch.Tensor, scale: float, bias: float) -> torch.Tensor:
    """Every pair a binary problem: matching pairs positive, all others negative; summed, per image."""
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = scale * float(image[i] @ text[j]) + bias
            label = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-label * z))
    return torch.tensor(total / n)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_loss_equals_a_naive_reference(kind: str) -> None:
    torch.manual_seed(0)
    objective = ClipPretraining(ClipModelConfig(), ClipLossConfig(kind=kind), ClipEvalConfig(), lambda *a: None)
    g = torch.Generator().manual_seed(3)
    image = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    loss_fn = objective._loss_fn(distributed=False)
    if kind == "clip":
        got, want = loss_fn(image, text, torch.tensor(7.5)), _naive_clip(image, text, 7.5)
    else:
        got, want = loss_fn(image, text, torch.tensor(10.0), torch.tensor(-10.0)), _naive_siglip(image, text, 10.0, -10.0)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-5)


def test_siglip_starts_from_its_own_temperature_and_bias() -> None:
    torch.manual_seed(0)
    objective = ClipPretraining(ClipModelConfig(), ClipLossConfig(kind="siglip"), ClipEvalConfig(), lambda *a: None)
    assert float(objective.model.logit_scale.detach().exp()) == pytest.approx(10.0)
    assert float(objective.model.logit_bias.detach()) == pytest.approx(-10.0)
    clip = ClipPretraining(ClipModelConfig(), ClipLossConfig(), ClipEvalConfig(), lambda *a: None)
    assert float(clip.model.logit_scale.detach().exp()) == pytest.approx(1 / 0.07, rel=1e-4)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_processes_gather_negatives_with_gradients(tmp_path: Path, kind: str) -> None:
    """DDP with half the batch per process: loss and gradients equal one process's over the whole batch."""
    proc = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "tests/dist_clip_grads.py", str(tmp_path / "g.pt"), kind],
               timeout=600, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "g.pt")
    objective, batch = build_objective(kind)
    objective.model.train()
    out = objective.compute(objective.model, batch)
    out["loss"].value.backward()
    want = grads(objective.model)
    assert got["loss"] == pytest.approx(float(out["loss"].value.detach()), rel=1e-5)
    assert got["grads"].keys() == want.keys() and len(want) > 20
    for name, value in want.items():
        torch.testing.assert_close(got["grads"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    # and it differs from what each process would get from its own half alone (the gather matters)
    alone = objective.compute(objective.model, half(batch, 0))["loss"].value.detach()
    assert abs(float(alone) - float(out["loss"].value.detach())) > 1e-3


def test_logit_scale_is_clamped_after_each_step() -> None:
    torch.manual_seed(0)
    objective = ClipPretraining(ClipModelConfig(), ClipLossConfig(), ClipEvalConfig(), lambda *a: None)
    with torch.no_grad():
        objective.model.logit_scale.fill_(math.log(500))
    objective.after_optimizer_step(objective.model, 1)
    assert float(objective.model.logit_scale.detach().exp()) == pytest.approx(100.0)


def test_recall_at_k() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.1, 0.2, 0.3]])
    # row 0: match ranks 1st; row 1: 2nd (0.8 above 0.5); row 2: 1st
    assert recall_at(sim, (1, 2)) == {1: pytest.approx(2 / 3), 2: 1.0}


def test_unknown_model_and_missing_checkpoint_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown open_clip model 'ViT-B-23'; did you mean ViT-B-32"):
        ClipPretraining(ClipModelConfig(name="ViT-B-23"), ClipLossConfig(), ClipEvalConfig(), lambda *a: None)
    with pytest.raises(ConfigError, match="no such file or folder"):
        ClipPretraining(ClipModelConfig(pretrained=str(tmp_path / "nope.pt")), ClipLossConfig(), ClipEvalConfig(),
                        lambda *a: None)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_export_loads_back_in_open_clip_with_identical_embeddings(tmp_path: Path, kind: str) -> None:
    """Including SigLIP's trained bias, which open_clip builds only when the config asks for one."""
    import open_clip

    objective, batch = build_objective(kind)
    model = objective.model.eval()
    with torch.no_grad():
        model.logit_scale.fill_(1.5)
        if kind == "siglip":
            model.logit_bias.fill_(-3.0)
    objective.save_pretrained(model, tmp_path)
    with torch.no_grad():
        want_i, want_t = model.encode_image(batch["images"]), model.encode_text(batch["texts"])
    # the folder's own config, or the registered architecture (which needs to be told to have a bias) + the weights
    bias = {"init_logit_bias": 0.0} if kind == "siglip" else {}
    for name, pretrained, extra in ((f"local-dir:{tmp_path}", None, {}),
                                    ("multissl-tiny", str(tmp_path / "open_clip_model.safetensors"), bias)):
        loaded, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, **extra)
        loaded.eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode_image(batch["images"]), want_i)
            torch.testing.assert_close(loaded.encode_text(batch["texts"]), want_t)
        assert float(loaded.logit_scale) == 1.5
        assert (None if loaded.logit_bias is None else float(loaded.logit_bias)) == (-3.0 if kind == "siglip" else None)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path}")
    assert tokenizer(["a red circle"]).shape == (1, 32)
    # and a model started from the folder (model.pretrained=...) continues from those weights
    again = ClipPretraining(ClipModelConfig(pretrained=str(tmp_path)), ClipLossConfig(kind=kind), ClipEvalConfig(),
                            lambda *a: None)
    torch.testing.assert_close(again.model.logit_scale, model.logit_scale)
    if kind == "siglip":
        torch.testing.assert_close(again.model.logit_bias, model.logit_bias)
