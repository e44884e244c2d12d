"""Negative cosine similarity, the prediction loss of BYOL (Grill et al. 2020, eq. 2) and SimSiam
(Chen & He 2021, eq. 1).

Both compare the online branch's prediction ``p`` with the other branch's projection ``z`` under a
stop-gradient. BYOL writes its loss as ``||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)``, i.e.
``2 + 2 * negative_cosine(p, z)``: the same gradient up to the factor 2. Purely per sample, so
its mean over local rows already averages right under DDP (the trainer weighs processes by their
rows, which may differ when bad images were dropped); nothing is gathered.
"""

from __future__ import annotations

import torch
from torch import nn


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``-cos(p_i, z_i)`` averaged over the batch (0 for a batch of no rows, not NaN). The caller
    passes ``z.detach()``: the stop-gradient is what keeps SimSiam from collapsing, and it is not
    this function's to choose."""
    return -nn.functional.cosine_similarity(p.float(), z.float(), dim=1).sum() / max(p.shape[0], 1)
