"""Run under ``torchrun --nproc_per_node 2``: for each batch-statistic or cross-process image loss,
one backward step through DDP on CPU (gloo), each process holding half of a batch and gathering
the other half with ``gather_with_grad``; then one DINO centre update over both halves.

Saves rank 0's gradients and both ranks' centres; ``test_image_losses`` compares them with one
process's over the whole batch. Kept out of pytest's collection (no ``test_`` prefix).

    torchrun --standalone --nproc_per_node 2 tests/dist_image_losses.py OUT.pt
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable

import torch
from torch import nn

from multissl.losses.barlow_twins import barlow_twins_loss
from multissl.losses.dino import update_center
from multissl.losses.info_nce import info_nce
from multissl.losses.nt_xent import nt_xent
from multissl.losses.vicreg import vicreg_loss
from multissl.training.distributed import gather_with_grad

HALF = 4
KINDS = ("nt_xent", "info_nce", "barlow_twins", "vicreg")
Gather = Callable[[torch.Tensor], torch.Tensor]


def build() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The same tiny model everywhere and two views of 2 x HALF random inputs."""
    torch.manual_seed(0)
    model = nn.Linear(6, 5)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(2 * HALF, 6, generator=g), torch.randn(2 * HALF, 6, generator=g)
    return model, x1, x2


def teacher_outputs() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A starting centre and two global crops' teacher outputs for the whole batch."""
    g = torch.Generator().manual_seed(2)
    return torch.randn(1, 7, generator=g), [torch.randn(2 * HALF, 7, generator=g) for _ in range(2)]


def objective(kind: str, z1: torch.Tensor, z2: torch.Tensor, gather: Gather | None, rank: int) -> torch.Tensor:
    if kind == "nt_xent":
        return nt_xent(z1, z2, 0.5, gather=gather, rank=rank)[0]
    if kind == "info_nce":  # MoCo v3: both directions, keys from every process
        return (info_nce(z1, z2, 0.2, gather=gather, rank=rank)[0]
                + info_nce(z2, z1, 0.2, gather=gather, rank=rank)[0])
    if kind == "barlow_twins":
        return barlow_twins_loss(z1, z2, 0.05, gather=gather)[0]
    if kind == "vicreg":
        return vicreg_loss(z1, z2, gather=gather)[0]
    raise ValueError(kind)


def step(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, kind: str, gather: Gather | None,
         rank: int) -> dict[str, torch.Tensor]:
    """One forward of both views (a single call, as DDP expects) and backward; the gradients."""
    z1, z2 = model(torch.cat([x1, x2])).chunk(2)
    objective(kind, z1, z2, gather, rank).backward()
    return grads(model)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {n: p.grad.detach().clone() for n, p in inner.named_parameters()}


def main(argv: list[str]) -> None:
    dist = torch.distributed
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    part = slice(rank * HALF, (rank + 1) * HALF)
    result: dict[str, object] = {}
    for kind in KINDS:
        model, x1, x2 = build()
        ddp = nn.parallel.DistributedDataParallel(model)
        result[kind] = step(ddp, x1[part], x2[part], kind, gather_with_grad, rank)
    del ddp, model  # DDP's reducer gone while the process group lives: a reducer outliving it can abort the exit
    gc.collect()
    center, teacher = teacher_outputs()
    new = update_center(center, [t[part] for t in teacher], momentum=0.9, gather=gather_with_grad)
    centers = [torch.empty_like(new) for _ in range(dist.get_world_size())]
    dist.all_gather(centers, new)
    result["centers"] = centers
    if rank == 0:
        torch.save(result, argv[0])
    dist.barrier()


if __name__ == "__main__":
    from multissl.cli import leave_process_group

    main(sys.argv[1:])
    leave_process_group(0)  # as a recipe ends under torchrun: os._exit after flushing (gloo can abort on the way out)
