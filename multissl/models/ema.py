"""Momentum (EMA) copies of a network, the targets of BYOL, MoCo and DINO.

The target's weights follow the online network's, ``t <- m t + (1 - m) o``, with ``m`` raised from
its base value to 1 along a half cosine over training (BYOL's schedule, also MoCo v3's and DINO's).
Buffers (batch-norm running statistics) are the target's own: it runs its own forward passes.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def momentum_copy(online: nn.Module) -> nn.Module:
    """A frozen deep copy of ``online`` to serve as its EMA target (no gradients, never optimised)."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """``final - (final - base) * (1 + cos(pi * step / total)) / 2``: ``base`` at step 0, ``final`` at the end."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return final - (final - base) * (1 + math.cos(math.pi * progress)) / 2


def _whole(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter sharded by FSDP2 (a DTensor: an all-gather, which every
    process makes in the same order), or the parameter itself."""
    from torch.distributed.tensor import DTensor

    return param.full_tensor() if isinstance(param, DTensor) else param


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * online``, parameter by parameter (same layout).
    Under FSDP the target stays whole on every process and reads the online weights gathered one
    tensor at a time (a collective: every process calls it)."""
    t_params, o_params = list(target.parameters()), list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError("the EMA target and the online network have different parameters")
    torch._foreach_lerp_(t_params, [_whole(p.detach()) for p in o_params], 1.0 - momentum)
