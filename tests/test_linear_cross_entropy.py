"""The chunked linear cross-entropy equals the plain one (loss, argmax count and every gradient)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multissl.losses import linear_cross_entropy as lce


def _reference(hidden, weight, bias, targets):
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    valid = targets != lce.IGNORE_INDEX
    correct = ((logits.argmax(-1) == targets) & valid).sum()
    return F.cross_entropy(logits, targets, ignore_index=lce.IGNORE_INDEX, reduction="sum"), correct


def _inputs(rows: int, d: int, vocab: int, with_bias: bool, ignored: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, d, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, d, generator=g, dtype=torch.float64) / d**0.5
    bias = torch.randn(vocab, generator=g, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[torch.rand(rows, generator=g) < ignored] = lce.IGNORE_INDEX
    return hidden, weight, bias, targets


@pytest.mark.parametrize("rows,chunk", [(37, 8), (16, 16), (5, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("ignored", [0.0, 0.3, 1.0])
def test_equals_the_plain_loss_and_its_gradients(monkeypatch, rows, chunk, with_bias, ignored) -> None:
    monkeypatch.setattr(lce, "_chunk_rows", lambda vocab, device: chunk)  # chunk boundaries inside the rows
    ours = _inputs(rows, 12, 50, with_bias, ignored)
    ref = [t.clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in ours]
    ours = [t.clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in ours]
    hidden, weight, bias, targets = ours
    loss, correct = lce.linear_cross_entropy(hidden, weight, targets, bias)
    want, want_correct = _reference(*ref)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert int(correct) == int(want_correct)
    (3.0 * loss).backward()  # the backward scales the stored gradients by the upstream one
    (3.0 * want).backward()
    for got, exp in zip(ours, ref):
        if exp is not None and exp.is_floating_point():
            torch.testing.assert_close(got.grad.double(), exp.grad, rtol=1e-5, atol=1e-6)


def test_without_grad_it_computes_no_gradients_and_the_same_values() -> None:
    hidden, weight, bias, targets = _inputs(20, 8, 30, True, 0.2)
    with torch.no_grad():
        loss, correct = lce.linear_cross_entropy(hidden, weight, targets, bias)
    want, want_correct = _reference(hidden, weight, bias, targets)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert int(correct) == int(want_correct) and not loss.requires_grad


def test_under_bf16_autocast_it_stays_close_to_the_fp32_loss() -> None:
    hidden, weight, _, targets = _inputs(64, 32, 200, False, 0.1)
    hidden, weight = hidden.float().requires_grad_(), weight.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = lce.linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    want, _ = _reference(h, w, None, targets)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=2e-2, atol=0.0)
    torch.testing.assert_close(weight.grad, w.grad, rtol=0.1, atol=2e-2)
