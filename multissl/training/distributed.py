"""Collectives objectives need beyond Accelerate's: an all-gather that carries gradients, and
making non-trained modules identical on every process."""

from __future__ import annotations

import torch
from torch import nn


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0, in rank order, with gradients flowing
    back to each process's own part (Accelerate's ``gather`` drops them). Identity on one process."""
    if not _initialized() or torch.distributed.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every process's ``module`` (an EMA teacher
    built from a differently seeded init must start equal everywhere)."""
    if not _initialized() or torch.distributed.get_world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        torch.distributed.broadcast(tensor.data, src=src)


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Average ``module``'s floating-point buffers over processes: an EMA teacher's batch-norm running
    statistics, gathered from each process's own batches, become one estimate, the same everywhere."""
    if not _initialized() or torch.distributed.get_world_size() == 1:
        return
    world = torch.distributed.get_world_size()
    for buffer in module.buffers():
        if buffer.is_floating_point():
            torch.distributed.all_reduce(buffer)
            buffer.div_(world)


class AttributeForwardingDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP whose unknown attributes come from the wrapped module, so an objective's ``compute`` can
    read ``model.config`` or ``model.backbone`` whether or not it runs under several processes."""

    def __getattr__(self, name: str):  # noqa: ANN204 - nn.Module's signature
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)
