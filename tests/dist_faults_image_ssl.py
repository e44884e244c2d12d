"""Run under ``torchrun --standalone --nproc_per_node 2``: processes whose batches lost rows to bad
images, one of them every row. Two parts, one launch:

1. with ``--losses``: for each split of `SPLITS` (which of the 2 x HALF rows each process keeps),
   the gradient-carrying gather of uneven parts, every cross-process image loss through DDP weighed
   as the trainer weighs processes (by their rows), the DINO centre, and MoCo's shuffled key
   encoder; each rank saves ``OUT/losses_rank<r>.pt`` for ``test_faults_image_ssl`` to compare with
   one process over the kept rows.
2. the SimCLR recipe with the arguments after ``--`` (a folder holding bad images).

    torchrun --standalone --nproc_per_node 2 tests/dist_faults_image_ssl.py OUT [--losses] -- RECIPE_ARGS...

Kept out of pytest's collection (no ``test_`` prefix).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from multissl.losses.dino import update_center
from multissl.training.distributed import gather_with_grad, rows_before
from tests.dist_image_losses import HALF, KINDS, Gather, build, teacher_outputs

SPLITS = {
    "one_rank_empty": [True, False, True, True, False, False, False, False],
    "uneven": [True, False, True, True, False, False, True, False],
}
"""Rows kept (images that decoded) of the 2 x HALF batch; rank r holds rows r*HALF..(r+1)*HALF."""


def kept(split: str, rank: int) -> torch.Tensor:
    """The indices of the batch's rows that rank ``rank`` keeps."""
    valid = torch.tensor(SPLITS[split])
    return torch.arange(rank * HALF, (rank + 1) * HALF)[valid[rank * HALF : (rank + 1) * HALF]]


def loss_of(kind: str, z1: torch.Tensor, z2: torch.Tensor, gather: Gather | None, offset: int = 0) -> torch.Tensor:
    """One loss, this process's rows starting at ``offset`` in the gathered ones (0 with no gather)."""
    from multissl.losses.barlow_twins import barlow_twins_loss
    from multissl.losses.info_nce import info_nce
    from multissl.losses.nt_xent import nt_xent
    from multissl.losses.vicreg import vicreg_loss

    if kind == "nt_xent":
        return nt_xent(z1, z2, 0.5, gather=gather, offset=offset)[0]
    if kind == "info_nce":
        return (info_nce(z1, z2, 0.2, gather=gather, offset=offset)[0]
                + info_nce(z2, z1, 0.2, gather=gather, offset=offset)[0])
    if kind == "barlow_twins":
        return barlow_twins_loss(z1, z2, 0.05, gather=gather)[0]
    if kind == "vicreg":
        return vicreg_loss(z1, z2, gather=gather)[0]
    raise ValueError(kind)


def _trainer_weighted(loss: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the trainer differentiates for ``Mean(loss * rows, rows)`` under DDP, and the global value."""
    world = torch.distributed.get_world_size()
    count = torch.tensor([float(rows)])
    torch.distributed.all_reduce(count)
    total = torch.stack([(loss * rows).detach()]).reshape(1)
    torch.distributed.all_reduce(total)
    return loss * rows * world / count.clamp_min(1e-12)[0], total / count.clamp_min(1e-12)


def check_losses(out: Path, rank: int) -> None:
    result: dict[str, object] = {}
    world = torch.distributed.get_world_size()
    for split in SPLITS:
        rows = kept(split, rank)
        n = len(rows)
        offset = rows_before(n)
        # the gather itself: values in rank order, and each process's gradient is that of its own rows
        x = (torch.arange(2 * HALF * 3, dtype=torch.float32).view(2 * HALF, 3)[rows]).requires_grad_()
        gathered = gather_with_grad(x)
        weights = torch.linspace(-1, 1, gathered.numel()).view_as(gathered)
        (gathered * weights).sum().backward()
        grad = x.grad if x.grad is not None else torch.zeros_like(x)  # no rows: autograd may leave it unset
        result[f"{split}/gather"] = {"value": gathered.detach(), "grad": grad.clone(), "offset": offset,
                                     "weights": weights}
        for kind in KINDS:
            model, x1, x2 = build()
            ddp = nn.parallel.DistributedDataParallel(model)
            z = ddp(torch.cat([x1[rows], x2[rows]]))  # one forward of both views, as DDP expects
            z1, z2 = z[:n], z[n:]
            loss = loss_of(kind, z1, z2, gather_with_grad, offset)
            differentiated, value = _trainer_weighted(loss, n)
            differentiated.backward()
            result[f"{split}/{kind}"] = {"loss": float(value), "local_loss_finite": bool(torch.isfinite(loss)),
                                         "grads": {k: p.grad.clone() for k, p in model.named_parameters()}}
        center, teacher = teacher_outputs()
        result[f"{split}/center"] = update_center(center, [t[rows] for t in teacher], momentum=0.9,
                                                  gather=gather_with_grad)
        result[f"{split}/moco_keys"] = moco_keys(rows, rank, world)
    torch.save(result, out / f"losses_rank{rank}.pt")


def moco_keys(rows: torch.Tensor, rank: int, world: int) -> float:
    """MoCo v2's shuffled key encoder over uneven parts: in eval mode a key does not depend on its
    batch-mates, so the shuffled, encoded and unshuffled keys must equal this process's own. Returns
    the largest difference."""
    from multissl.data.views import AugmentConfig
    from multissl.models.backbones import BackboneConfig
    from multissl.objectives.joint_embedding import HeadConfig
    from multissl.objectives.moco import MoCo, MoCoLossConfig, MoCoModelConfig

    torch.manual_seed(0)  # the same key encoder on every process
    cfg = MoCoModelConfig(backbone=BackboneConfig(kwargs={"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16]}),
                          projector=HeadConfig(hidden=[16], out=8))
    objective = MoCo(cfg, MoCoLossConfig(queue_size=8), augment=AugmentConfig(size=16))
    objective.rank, objective.world_size, objective.gather = rank, world, gather_with_grad
    assert objective.target is not None
    objective.target.eval()
    images = torch.randn(2 * HALF, 3, 16, 16, generator=torch.Generator().manual_seed(5))[rows]
    with torch.no_grad():
        keys = objective._keys(images, shuffle=True)
        own = objective.target(images)[1]
    assert keys.shape == own.shape and objective.shuffles == 1
    return float((keys - own).abs().max()) if len(own) else 0.0


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    recipe_args = argv[argv.index("--") + 1 :]
    if "--losses" in argv[: argv.index("--")]:
        from accelerate import PartialState

        state = PartialState(cpu=True)  # the process group (gloo) the recipe's trainer takes over
        check_losses(out, state.process_index)
        torch.distributed.barrier()
    from multissl_recipes import simclr

    from multissl.cli import run_recipe

    run_recipe(simclr.main, recipe_args)  # as `python recipes/simclr.py` runs: it closes the group and leaves


if __name__ == "__main__":
    main(sys.argv[1:])
