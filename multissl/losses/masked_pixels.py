"""MAE's reconstruction loss (He et al. 2021): mean squared error between predicted and true pixels,
per patch, averaged over the masked patches only; with ``norm_pix`` each target patch is first
normalised by its own mean and variance (the paper's default, which gives better representations)."""

from __future__ import annotations

import torch


def patch_targets(patches: torch.Tensor, norm_pix: bool, eps: float = 1e-6) -> torch.Tensor:
    """``(B, L, P)`` pixel patches, each normalised to zero mean and unit variance when ``norm_pix``."""
    if not norm_pix or patches.numel() == 0:  # a batch of no images (all bad) has nothing to normalise
        return patches
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)  # unbiased, as the paper's code
    return (patches - mean) / (var + eps).sqrt()


def masked_patch_mse(predictions: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor,
                     norm_pix: bool = True) -> torch.Tensor:
    """``predictions`` and ``patches`` (B, L, P), ``mask`` (B, L) with 1 where a patch was hidden:
    the mean over hidden patches of each patch's mean squared error (0 for a batch of no images)."""
    per_patch = (predictions.float() - patch_targets(patches.float(), norm_pix)).pow(2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
