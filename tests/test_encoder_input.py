"""A speech encoder handed a copy of its input: transformers' encoder zeroes padded frames in place,
which autograd forbids on the view FSDP2's hooks make of a unit's input; with the copy it runs, with
the same outputs and gradients. (Under FSDP itself: tests/test_sharding.py.)"""

from __future__ import annotations

import pytest
import torch

from multissl.models.encoder_input import encoder_gets_a_copy
from tests.test_conv_features import _tiny


class _AsFsdpHandsItOver(torch.autograd.Function):
    """What FSDP2 does to a sharded unit's inputs (its post-backward registration): an identity
    custom function whose output is a view of its input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad


def _encode(model: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor, through_view: bool,
            by_name: bool = False) -> torch.Tensor:
    x = hidden.clone().requires_grad_(True)
    given = _AsFsdpHandsItOver.apply(x) if through_view else x * 1.0  # (as DDP hands it over: a layer's output)
    encoder = model.wav2vec2.encoder
    out = encoder(hidden_states=given, attention_mask=mask) if by_name else encoder(given, attention_mask=mask)
    y = out.last_hidden_state
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return torch.cat([y.detach().flatten(), x.grad.flatten()])


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_the_encoder_runs_on_a_custom_functions_view_with_the_same_outputs_and_gradients(norm: str) -> None:
    model = _tiny(norm).train()
    torch.manual_seed(1)
    hidden = torch.randn(2, 12, model.config.hidden_size)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0  # padded frames: the encoder zeroes them in place
    want = _encode(model, hidden, mask, through_view=False)
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        _encode(model, hidden, mask, through_view=True)
    model.zero_grad()
    assert encoder_gets_a_copy(model) is model
    for by_name in (False, True):
        torch.testing.assert_close(_encode(model, hidden, mask, through_view=True, by_name=by_name), want, rtol=0, atol=0)
        model.zero_grad()
    encoder_gets_a_copy(model)  # idempotent: one hook, not two
    assert len(model.wav2vec2.encoder._forward_pre_hooks) == 1
