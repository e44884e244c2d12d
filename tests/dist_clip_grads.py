"""Run under ``torchrun --nproc_per_node 2``: one CLIP backward step through DDP with negatives
gathered across processes, each process holding half of a batch.

Saves rank 0's gradients and loss; ``test_clip`` compares them with one process's over the whole
batch. Kept out of pytest's collection (no ``test_`` prefix).

    torchrun --nproc_per_node 2 tests/dist_clip_grads.py OUT.pt [clip|siglip]
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any

import torch

from multissl.objectives.clip import ClipEvalConfig, ClipLossConfig, ClipModelConfig, ClipPretraining

HALF = 4


def build_objective(kind: str) -> tuple[ClipPretraining, dict[str, torch.Tensor]]:
    """The same initial model everywhere and one batch of 2 x HALF random images and captions."""
    torch.manual_seed(0)
    objective = ClipPretraining(ClipModelConfig(), ClipLossConfig(kind=kind), ClipEvalConfig(), lambda *a: None)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2 * HALF, 3, 64, 64, generator=g)
    texts = torch.randint(1, 1000, (2 * HALF, 32), generator=g)
    return objective, {"images": images, "texts": texts}


def half(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    return {k: v[rank * HALF : (rank + 1) * HALF] for k, v in batch.items()}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def main(argv: list[str]) -> Any:
    from multissl.training.trainer import Trainer, TrainerConfig

    out, kind = argv[0], (argv[1] if len(argv) > 1 else "clip")
    trainer = Trainer(TrainerConfig(output_dir=tempfile.mkdtemp(), trackers=[], progress_bar=False))
    acc = trainer.accelerator
    objective, batch = build_objective(kind)
    model = acc.prepare(objective.model)
    result = objective.compute(model, half(batch, acc.process_index))
    loss = trainer._backward_loss(result["loss"])
    acc.backward(loss)
    total = acc.reduce(loss.detach().reshape(1), reduction="mean")
    if acc.is_main_process:
        torch.save({"grads": grads(acc.unwrap_model(model)), "loss": float(total)}, out)
    acc.wait_for_everyone()


if __name__ == "__main__":
    from multissl.cli import leave_process_group

    main(sys.argv[1:])
    leave_process_group(0)  # as a recipe ends under torchrun: os._exit after flushing (gloo can abort on the way out)
