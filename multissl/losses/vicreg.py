"""VICReg's variance-invariance-covariance loss (Bardes et al. 2022, eq. 1-6).

``invariance * s(Z, Z') + variance * v + covariance * c`` with ``s`` the mean squared error, and
for each branch ``v(Z) = mean_d relu(1 - sqrt(Var(z_d) + eps))`` (unbiased variance) and
``c(Z) = sum_{i != j} Cov(Z)_ij^2 / D`` (unbiased covariance). Scaling chosen: that of the
authors' code (and lightly), ``v = (v(Z) + v(Z')) / 2`` and ``c = c(Z) + c(Z')``, which the
published coefficients (25, 25, 1) were tuned with; the paper's eq. 6 sums the two variance terms
instead, i.e. the same loss with ``variance`` doubled.

Across processes: the invariance term is per sample, so its mean over local rows is averaged right
by DDP; the variance and covariance terms are batch statistics, so every process gathers both
branches with gradients and computes them identically over the global batch, where the gather's
summing backward and DDP's averaging cancel. Together: one process's gradient over the whole batch.

Processes may hold different numbers of rows (bad images dropped), none included: the invariance
is a sum over this process's rows divided by their count (0, not NaN, with none) and the trainer
weighs processes by their rows. A global batch of one row has no variance or covariance to measure:
both are taken as 0 (the variance term is then the constant ``relu(1 - sqrt(eps))``, no gradient);
with no row anywhere the loss is a zero that keeps the graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _variance_term(z: torch.Tensor, eps: float) -> torch.Tensor:
    return nn.functional.relu(1 - torch.sqrt(z.var(0, correction=1 if len(z) > 1 else 0) + eps)).mean()


def _covariance_term(z: torch.Tensor) -> torch.Tensor:
    n, d = z.shape
    centred = z - z.mean(0)
    cov = centred.T @ centred / max(n - 1, 1)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, invariance: float = 25.0, variance: float = 25.0,
                covariance: float = 1.0, gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                eps: float = 1e-4) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, parts)`` for the two branches' embeddings ``(N, D)`` on this process; ``gather``
    concatenates over processes in rank order (None: one process). ``parts`` holds the unweighted
    ``invariance``, ``variance`` (branch mean) and ``covariance`` (branch sum) terms, detached."""
    z1, z2 = z1.float(), z2.float()
    inv = nn.functional.mse_loss(z1, z2, reduction="sum") / max(z1.numel(), 1)
    if gather is not None:
        z1, z2 = gather(z1), gather(z2)
    if z1.shape[0] == 0:  # no row on any process
        zero = inv + (z1.sum() + z2.sum()) * 0.0
        return zero, {"invariance": zero.detach(), "variance": zero.detach(), "covariance": zero.detach()}
    var = (_variance_term(z1, eps) + _variance_term(z2, eps)) / 2
    cov = _covariance_term(z1) + _covariance_term(z2)
    loss = invariance * inv + variance * var + covariance * cov
    return loss, {"invariance": inv.detach(), "variance": var.detach(), "covariance": cov.detach()}
