"""NT-Xent, SimCLR's normalised temperature-scaled cross-entropy (Chen et al. 2020, eq. 1).

For ``2N`` embeddings (two views of ``N`` images), each one's positive is the other view of its
image and its negatives are the other ``2N - 2``; the loss is the mean over all ``2N`` anchors of
``-log softmax(sim / T)`` at the positive, with cosine similarity and the anchor itself excluded.

Across processes, each process's anchors are scored against the views of every process (gathered
with gradients), as open_clip's ``local_loss`` does: memory stays linear in the global batch, and
with DDP's averaging the gradient equals one process's over the whole batch. Processes may hold
different numbers of rows (bad images dropped), none included: ``offset`` says where this process's
rows start in the gathered views, the loss is a sum over this process's anchors divided by their
count (0, not NaN, with none), and the trainer weighs processes by their rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5,
            gather: Callable[[torch.Tensor], torch.Tensor] | None = None, rank: int = 0,
            offset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, correct)`` for views ``z1``, ``z2`` of shape ``(N, D)`` on this process (N may be 0).

    ``gather`` concatenates a tensor over processes in rank order (identity when None); ``offset``
    is the row where this process's views start in it (`multissl.training.distributed.rows_before`;
    None: ``rank * N``, right when every process holds N rows); ``correct`` counts this process's
    anchors whose positive scores above every negative (contrastive accuracy)."""
    z1, z2 = nn.functional.normalize(z1.float(), dim=1), nn.functional.normalize(z2.float(), dim=1)
    n = z1.shape[0]
    g1, g2 = (gather(z1), gather(z2)) if gather is not None else (z1, z2)
    total = g1.shape[0]
    if total == 0:  # no row on any process: a zero that keeps the graph
        return (z1.sum() + z2.sum()) * 0.0, torch.zeros((), dtype=torch.long, device=z1.device)
    anchors = torch.cat([z1, z2])                      # (2n, D): this process's
    candidates = torch.cat([g1, g2])                   # (2T, D): every process's, views 1 then 2
    logits = anchors @ candidates.T / temperature
    start = rank * n if offset is None else offset
    own = start + torch.arange(n, device=z1.device)    # this process's rows within each gathered view
    self_cols = torch.cat([own, own + total])
    positive = torch.cat([own + total, own])            # view 1's positive is its view 2, and back
    rows = torch.arange(2 * n, device=z1.device)
    logits = logits.masked_fill(torch.zeros_like(logits, dtype=torch.bool).index_put_((rows, self_cols),
                                                                                       torch.tensor(True)), float("-inf"))
    loss = nn.functional.cross_entropy(logits, positive, reduction="sum") / max(2 * n, 1)
    with torch.no_grad():
        correct = (logits.argmax(1) == positive).sum()
    return loss, correct
