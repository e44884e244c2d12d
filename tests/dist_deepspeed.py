"""Run under ``accelerate launch`` with a DeepSpeed config: a step whose loss is NaN under DeepSpeed's
engine (see ``test_deepspeed.test_a_nonfinite_step_is_skipped_by_the_engine``). Rank 0 saves what it
saw to ``OUT/seen.pt``. Kept out of pytest's collection (no ``test_`` prefix).

    accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml --num_processes 2 \
        --mixed_precision no tests/dist_deepspeed.py OUT [no|bf16]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from multissl.training.objective import Objective
from tests.toy import Toy, toy_data


class EngineToy(Toy):
    """The toy without its gradient recorder: an objective that edits nothing in the step."""

    before_optimizer_step = Objective.before_optimizer_step


def main(out: Path, precision: str) -> None:
    from multissl.training.trainer import Trainer, TrainerConfig

    trainer = Trainer(TrainerConfig(output_dir=str(out / "run"), trackers=[], progress_bar=False, max_steps=6,
                                    batch_size=8, eval_batch_size=16, lr=1e-2, seed=5, log_every=1,
                                    mixed_precision=precision))
    toy = EngineToy(nan_at_steps={3})
    weights: dict[int, dict[str, torch.Tensor]] = {}

    def keep(step: int) -> None:  # at each step's end: after the update, or the skip
        weights[step] = {k: v.detach().float().clone() for k, v in toy.model.state_dict().items()}

    toy.hook = keep
    data = toy_data()
    result = trainer.fit(toy, data[:160], data[160:208])
    if trainer.is_main:
        torch.save({"weights": weights, "nonfinite_total": result.state.nonfinite_total,
                    "step": result.state.step}, out / "seen.pt")


if __name__ == "__main__":
    from multissl.cli import leave_process_group

    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "no")
    leave_process_group(0)
