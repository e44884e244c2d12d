"""Give a speech encoder a fresh copy of its input, so sharded training can run it.

transformers' wav2vec 2.0 encoders (and HuBERT's, WavLM's, ...) zero the padded frames of their
input in place. Under FSDP2 that input can be the output of FSDP's own autograd function (it
registers the post-backward of every sharded unit on the unit's inputs, and Accelerate makes the
encoder a unit of its own: its class name, ``...EncoderStableLayerNorm``, reads to it as the
model's final norm), and autograd forbids modifying such a view in place. A forward pre-hook that
hands the encoder a copy (after FSDP's own pre-hooks, which run first) computes the same function
with the same gradients, at the cost of one copy of the encoder's input a forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _copy_hidden_states(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The encoder's input, ``hidden_states`` (first positional or by name), replaced by a copy."""
    if args and isinstance(args[0], torch.Tensor):
        return (args[0].clone(), *args[1:]), kwargs
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].clone()}
    return None


def encoder_gets_a_copy(model: nn.Module) -> nn.Module:
    """``model`` (a transformers speech model) with its encoder handed a copy of its input at every
    forward (in place; returned for chaining). A model without ``base_model.encoder`` is left as it is."""
    encoder = getattr(getattr(model, "base_model", model), "encoder", None)
    if isinstance(encoder, nn.Module) and not getattr(encoder, "_multissl_copies_input", False):
        encoder.register_forward_pre_hook(_copy_hidden_states, with_kwargs=True)
        encoder._multissl_copies_input = True
    return model
