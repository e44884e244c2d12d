"""Barlow Twins' redundancy-reduction loss (Zbontar et al. 2021, eq. 1 and 2).

With each embedding dimension standardised over the batch (zero mean, unit biased variance, as
``BatchNorm1d(affine=False)`` does, ``eps`` inside the square root), the cross-correlation matrix
is ``C = z1n.T @ z2n / N`` and the loss ``sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2``.

Across processes the statistics and ``C`` are those of the global batch, as in the authors' code
(SyncBatchNorm, then ``C`` summed over processes): every process gathers both views with gradients
and computes the same global loss; each process's slice then gets ``world_size`` times its
gradient (the gather's backward sums every process's copy), which DDP's averaging undoes, leaving
one process's gradient over the whole batch. (Standardising each process's half on its own, as
lightly's ``gather_distributed`` does, is a different loss.)

Processes may hold different numbers of rows (bad images dropped), none included: the statistics
are over the gathered rows whatever their split, and the trainer weighs each process's copy of the
loss by its rows, which still sums its gradients to one process's over the whole batch. With no row
anywhere the loss is a zero that keeps the graph (so the backward, and DDP's, still run).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambda_offdiag: float = 5e-3,
                      gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, parts)`` for the two views' embeddings ``(N, D)`` on this process; ``gather``
    concatenates over processes in rank order (None: one process). ``parts`` holds the unweighted
    ``on_diagonal`` and ``off_diagonal`` sums, detached."""
    z1, z2 = z1.float(), z2.float()
    if gather is not None:
        z1, z2 = gather(z1), gather(z2)
    if z1.shape[0] == 0:  # no row on any process: nothing to correlate
        zero = (z1.sum() + z2.sum()) * 0.0
        return zero, {"on_diagonal": zero.detach(), "off_diagonal": zero.detach()}
    c = _standardise(z1).T @ _standardise(z2) / z1.shape[0]   # (D, D) over the global batch
    diagonal = torch.diagonal(c)
    on = (1 - diagonal).pow(2).sum()
    off = c.pow(2).sum() - diagonal.pow(2).sum()
    loss = on + lambda_offdiag * off
    return loss, {"on_diagonal": on.detach(), "off_diagonal": off.detach()}
