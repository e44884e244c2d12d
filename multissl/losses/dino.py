"""DINO's self-distillation loss (Caron et al. 2021, eq. 2-4), its centre and teacher temperature.

The teacher's output for each global crop, centred and sharpened, ``softmax((t - c) / T_t)``, is
the target of the student's ``log_softmax(s / T_s)`` for every other crop; the loss is the mean
cross-entropy over those (teacher crop, student crop) pairs that are not the same crop.

The cross-entropy is per sample, so each process averages over its own rows and DDP's averaging
makes that the whole batch's mean; only the centre, a batch statistic without gradient, needs the
global batch, and every process must hold the same one. A process may hold no rows (every image
of its batch was bad): its loss is then 0 (a sum over no rows, not the NaN of an empty mean), and
the centre moves only with rows from somewhere (none anywhere: it stays).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def dino_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], center: torch.Tensor,
              student_temperature: float = 0.1, teacher_temperature: float = 0.04) -> torch.Tensor:
    """Mean over pairs ``(i, j)``, ``i`` a teacher (global) crop, ``j`` a student crop, ``i != j``,
    of the batch mean of ``-sum_k q_ik log p_jk`` (0 for a batch of no rows). ``student`` lists every
    crop's ``(N, K)`` head output, global crops first, so student crop ``i`` is teacher crop ``i``;
    ``center`` is ``(1, K)``."""
    targets = [nn.functional.softmax((t.detach().float() - center.float()) / teacher_temperature, dim=-1)
               for t in teacher]
    log_probs = [nn.functional.log_softmax(s.float() / student_temperature, dim=-1) for s in student]
    rows = max(student[0].shape[0], 1)
    terms = [-(q * log_p).sum() / rows for i, q in enumerate(targets)
             for j, log_p in enumerate(log_probs) if i != j]
    if not terms:
        raise ValueError(f"no (teacher, student) crop pairs with {len(teacher)} teacher and {len(student)} student crops")
    return torch.stack(terms).mean()


@torch.no_grad()
def update_center(center: torch.Tensor, teacher: Sequence[torch.Tensor], momentum: float = 0.9,
                  gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The centre's exponential moving average: ``momentum * center + (1 - momentum) * mean`` of
    the teacher outputs over every global crop and the global batch (``gather`` concatenates over
    processes, None: one process), so every process keeps the same centre. Shape ``(1, K)``."""
    outputs = torch.cat([t.float() for t in teacher])
    if gather is not None:
        outputs = gather(outputs)
    if outputs.shape[0] == 0:  # no teacher output on any process
        return center.clone()
    batch_center = outputs.mean(0, keepdim=True)
    return momentum * center + (1 - momentum) * batch_center.to(center.dtype)


def teacher_temperature(step: int, warmup_steps: int, start: float = 0.04, end: float = 0.07) -> float:
    """Linear warm-up from ``start`` at step 0 to ``end`` at ``warmup_steps``, then ``end``: the
    paper found a soft (high-temperature) teacher unstable early in training. Per step, not per
    epoch as in the authors' code, whose ``linspace`` also reaches ``end`` one epoch earlier."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps
