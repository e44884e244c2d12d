"""Run under ``torchrun --nproc_per_node 2``: the objective contract across processes (see
``test_objective_contract.test_two_processes_keep_auxiliary_modules_identical``). Each rank saves
what it saw to ``OUT/rank<r>.pt``. Kept out of pytest's collection (no ``test_`` prefix).

    torchrun --nproc_per_node 2 tests/dist_contract.py OUT
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from tests.toy import toy_data
from tests.toy_teacher import TeacherToy


class MarkedToy(TeacherToy):
    """Reads an attribute of the model in compute (through DDP), counts eval batches."""

    def __init__(self) -> None:
        super().__init__()
        self.model.marker = "student"
        self.attribute_seen: set[str] = set()
        self.eval_batches = 0

    def compute(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        if model.marker == "student":
            self.attribute_seen.add("train" if model.training else "eval")
        if not model.training:
            self.eval_batches += 1
        return super().compute(model, batch)


def main(out: Path) -> None:
    from multissl.training.trainer import Trainer, TrainerConfig

    trainer = Trainer(TrainerConfig(output_dir=tempfile.mkdtemp(), trackers=[], progress_bar=False, max_steps=6,
                                    batch_size=8, eval_batch_size=16, lr=1e-2, seed=5))
    rank = trainer.accelerator.process_index
    torch.manual_seed(100 + rank)  # a teacher that differs per process until the trainer aligns it
    toy = MarkedToy()
    with torch.no_grad():
        for p in toy.teacher.parameters():
            p.add_(torch.randn_like(p))
    data = toy_data()
    seen: dict[str, Any] = {}
    original_setup = toy.setup

    def setup(context: Any) -> None:  # after the trainer prepared the auxiliary modules; collectives work here
        peers: list[Any] = [None, None]
        torch.distributed.all_gather_object(peers, {k: v.tolist() for k, v in toy.teacher.state_dict().items()})
        seen["teacher_start_equal"] = peers[0] == peers[1]
        x = torch.full((1, 2), float(rank), requires_grad=True)
        g = context.gather(x)
        (g * torch.arange(g.shape[0], dtype=torch.float32)[:, None]).sum().backward()
        seen["gathered"], seen["grad"] = g.detach(), x.grad
        original_setup(context)

    toy.setup = setup
    trainer.fit(toy, data[:160], data[160:208])  # 48 eval samples: 3 batches of 16, two on rank 0
    ranks_after = [None, None]  # the group outlives fit (destroying it is what gloo aborts on now and then)
    torch.distributed.all_gather_object(ranks_after, rank)
    torch.save({
        "rank": rank,
        "teacher": {k: v.cpu() for k, v in toy.teacher.state_dict().items()},
        "teacher_start_equal": seen["teacher_start_equal"],
        "eval_batches": toy.eval_batches,
        "attribute_seen": toy.attribute_seen,
        "gathered": seen["gathered"],
        "grad": seen["grad"],
        "ranks_after_fit": ranks_after,
    }, out / f"rank{rank}.pt")


if __name__ == "__main__":
    from multissl.cli import leave_process_group

    main(Path(sys.argv[1]))
    leave_process_group(0)  # as a recipe ends under torchrun: os._exit after flushing (gloo can abort on the way out)
