"""InfoNCE, MoCo's contrastive loss (He et al. 2020, eq. 1; Chen et al. 2021, MoCo v3).

For a query ``q`` with positive key ``k+`` and negatives ``k-``, the loss is
``-log exp(q.k+ / T) / (exp(q.k+ / T) + sum exp(q.k- / T))``: a ``(1 + negatives)``-way
cross-entropy with the positive as class 0, over L2-normalised vectors.

MoCo v2 draws the negatives from a queue of earlier keys (no gradient, so nothing to gather
with gradients: the caller enqueues the gathered keys after the step). MoCo v3 drops the queue:
the negatives are the keys of every process's batch, and each query's positive is its own key at
``rank * N + i`` in the gathered batch. Each process averages over its own queries only, so with
DDP's averaging (and ``gather`` summing the key gradients back to their owner) the gradient equals
one process's over the whole batch. Processes may hold different numbers of queries (bad images
dropped), none included: ``offset`` places this process's keys in the gathered ones, and the loss is
a sum over its queries divided by their count (0, not NaN, with none).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def info_nce(query: torch.Tensor, key: torch.Tensor, temperature: float, queue: torch.Tensor | None = None,
             gather: Callable[[torch.Tensor], torch.Tensor] | None = None, rank: int = 0,
             offset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, correct)`` for queries and keys of shape ``(N, D)`` on this process (row ``i`` of
    each is the same image; N may be 0).

    With ``queue`` (``(K, D)``, normalised, no gradient) the negatives are its rows and ``gather``
    is unused; without, they are every process's keys, concatenated in rank order by ``gather``
    (identity when None), this process's starting at row ``offset`` (None: ``rank * N``, right when
    every process holds N rows). The mean is over this process's queries; MoCo v3's ``2T`` factor and
    symmetrisation are the caller's. ``correct`` counts queries whose positive scores highest."""
    q = nn.functional.normalize(query.float(), dim=1)
    k = nn.functional.normalize(key.float(), dim=1)
    n = q.shape[0]
    if queue is not None:
        positive = (q * k).sum(1, keepdim=True)                  # (N, 1)
        negative = q @ queue.float().detach().T                  # (N, K)
        logits = torch.cat([positive, negative], dim=1) / temperature
        target = torch.zeros(n, dtype=torch.long, device=q.device)
    else:
        keys = gather(k) if gather is not None else k            # (N_total, D), rank order
        if keys.shape[0] == 0:  # no key on any process: a zero that keeps the graph
            return (q.sum() + keys.sum()) * 0.0, torch.zeros((), dtype=torch.long, device=q.device)
        logits = q @ keys.T / temperature
        target = (rank * n if offset is None else offset) + torch.arange(n, device=q.device)
    loss = nn.functional.cross_entropy(logits, target, reduction="sum") / max(n, 1)
    with torch.no_grad():
        correct = (logits.argmax(1) == target).sum()
    return loss, correct


@torch.no_grad()
def enqueue(queue: torch.Tensor, ptr: int, keys: torch.Tensor) -> int:
    """Write ``keys`` (already gathered over processes and normalised) into the ring buffer
    ``queue`` in place from row ``ptr``, wrapping past the end; returns the next write position.

    The result is that of writing the keys one at a time, so when there are more keys than rows
    only the newest ``len(queue)`` survive, each at the row it would have reached."""
    size, n = queue.shape[0], keys.shape[0]
    if n > size:  # the older keys would be overwritten within this call anyway
        ptr, keys, n = (ptr + n - size) % size, keys[n - size:], size
    rows = (ptr + torch.arange(n, device=queue.device)) % size
    queue[rows] = keys.detach().to(queue.dtype)
    return int((ptr + n) % size)
