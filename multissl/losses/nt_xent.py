"""NT-Xent, SimCLR's normalised temperature-scaled cross-entropy (Chen et al. 2020, eq. 1).

For ``2N`` embeddings (two views of ``N`` images), each one's positive is the other view of its
image and its negatives are the other ``2N - 2``; the loss is the mean over all ``2N`` anchors of
``-log softmax(sim / T)`` at the positive, with cosine similarity and the anchor itself excluded.

Across processes, each process's anchors are scored against the views of every process (gathered
with gradients), as open_clip's ``local_loss`` does: memory stays linear in the global batch, and
with DDP's averaging the gradient equals one process's over the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5,
            gather: Callable[[torch.Tensor], torch.Tensor] | None = None, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, correct)`` for views ``z1``, ``z2`` of shape ``(N, D)`` on this process.

    ``gather`` concatenates a tensor over processes in rank order (identity when None); ``correct``
    counts this process's anchors whose positive scores above every negative (contrastive accuracy)."""
    z1, z2 = nn.functional.normalize(z1.float(), dim=1), nn.functional.normalize(z2.float(), dim=1)
    n = z1.shape[0]
    g1, g2 = (gather(z1), gather(z2)) if gather is not None else (z1, z2)
    total = g1.shape[0]
    anchors = torch.cat([z1, z2])                      # (2n, D): this process's
    candidates = torch.cat([g1, g2])                   # (2T, D): every process's, views 1 then 2
    logits = anchors @ candidates.T / temperature
    own = rank * n + torch.arange(n, device=z1.device)  # this process's rows within each gathered view
    self_cols = torch.cat([own, own + total])
    positive = torch.cat([own + total, own])            # view 1's positive is its view 2, and back
    rows = torch.arange(2 * n, device=z1.device)
    logits = logits.masked_fill(torch.zeros_like(logits, dtype=torch.bool).index_put_((rows, self_cols),
                                                                                       torch.tensor(True)), float("-inf"))
    loss = nn.functional.cross_entropy(logits, positive)
    with torch.no_grad():
        correct = (logits.argmax(1) == positive).sum()
    return loss, correct
