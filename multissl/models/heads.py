"""The small MLPs image-SSL methods put on a backbone: projectors, predictors and DINO's head.

Each paper's head is one call to `mlp` with its widths and where its batch norms go (SimCLR's
Linear-BN-ReLU-Linear, SimSiam's BN on the output, MoCo v3's affine-free last BN), so a method
module says which head it uses instead of building one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def mlp(dims: Sequence[int], *, batch_norm: bool = True, last_batch_norm: bool = False,
        last_affine: bool = True, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """``dims[0] -> ... -> dims[-1]``: Linear(-BN)-activation between layers, a plain Linear at the end
    (plus a BatchNorm when ``last_batch_norm``, affine-free unless ``last_affine``). Linears followed
    by a BatchNorm have no bias (the norm's shift replaces it)."""
    if len(dims) < 2:
        raise ValueError(f"an MLP needs at least an input and an output width, got {list(dims)}")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        norm = last_batch_norm if last else batch_norm
        layers.append(nn.Linear(d_in, d_out, bias=not norm))
        if norm:
            layers.append(nn.BatchNorm1d(d_out, affine=last_affine if last else True))
        if not last:
            layers.append(activation())
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021): a GELU MLP to a bottleneck, L2 normalisation, and
    a weight-normalised linear layer to ``out_dim`` prototypes whose norms stay fixed at 1 (the
    paper's ``norm_last_layer``, which it found steadier), written as a normalised weight instead
    of a weight-norm parametrisation so EMA copies and checkpoints see one plain tensor.
    ``batch_norm`` puts a BatchNorm after each hidden layer (the authors' ``use_bn_in_head``): it
    removes what every image of a batch shares, which a ResNet's pooled post-ReLU features carry in
    bulk and which, unremoved, lets every output point one way (see `DINOHeadConfig.batch_norm`)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden: int = 2048, bottleneck: int = 256,
                 layers: int = 3, batch_norm: bool = False) -> None:
        super().__init__()
        self.mlp = mlp([in_dim, *[hidden] * (layers - 1), bottleneck], batch_norm=batch_norm, activation=nn.GELU)
        self.last_layer = nn.Linear(bottleneck, out_dim, bias=False)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(self.mlp(x), dim=-1)
        return nn.functional.linear(x, nn.functional.normalize(self.last_layer.weight, dim=1))
