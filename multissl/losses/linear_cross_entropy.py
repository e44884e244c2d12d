"""Cross-entropy of a linear vocabulary projection, computed chunk by chunk, without full logits.

A causal LM's loss projects every position onto the vocabulary: for a small model that projection
is most of a step's compute, and its (tokens x vocabulary) logits, their softmax and their gradient
are the largest tensors of the step, each written and read several times. Here the logits exist one
chunk of rows at a time, small enough to stay in cache: each chunk's loss, correct-prediction count
and gradients (softmax minus one-hot, times the weight and the inputs) are computed in the forward,
and the backward only scales the stored gradients. The FLOPs are those of the plain loss; the
memory traffic and the peak memory are a fraction of them. Targets equal to ``ignore_index`` add
nothing to the loss and get a zero gradient, so batches keep static shapes (no boolean selection).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk: about 4 MB of fp32 logits on a CPU (cache-sized), 256 MB on an accelerator."""
    budget = 2**20 if device.type == "cpu" else 2**26
    return max(1, budget // max(1, vocab))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


def _chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
            with_grads: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """``(loss sum, correct count, (grad_hidden, grad_weight, grad_bias?) of the loss sum)``."""
    dtype = _compute_dtype(hidden)
    rows = _chunk_rows(weight.shape[0], hidden.device)
    w = weight.to(dtype)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if with_grads else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grads else None
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if with_grads and bias is not None else None
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start : start + rows].to(dtype)
            t = targets[start : start + rows]
            valid = t != IGNORE_INDEX
            safe = t.clamp_min(0).unsqueeze(1)
            logits = (h @ w.T).float()
            if bias is not None:
                logits += bias.float()
            lse = torch.logsumexp(logits, dim=1)
            loss += ((lse - logits.gather(1, safe).squeeze(1)) * valid).sum()
            correct += ((logits.argmax(dim=1) == t) & valid).sum()
            if not with_grads:
                continue
            probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
            probs.scatter_add_(1, safe, -torch.ones_like(safe, dtype=probs.dtype))
            probs *= valid.unsqueeze(1)
            g = probs.to(dtype)
            grad_hidden[start : start + rows] = (g @ w).to(hidden.dtype)
            if dtype == torch.float32:
                grad_weight.addmm_(g.T, h)
            else:  # the matmul at the autocast precision, summed in fp32
                grad_weight += (g.T @ h).float()
            if grad_bias is not None:
                grad_bias += probs.sum(0)
    grads = (grad_hidden, grad_weight.to(weight.dtype)) if with_grads else ()
    if grad_bias is not None:
        grads += (grad_bias.to(bias.dtype),)
    return loss, correct, grads


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):  # type: ignore[override]
        loss, correct, grads = _chunks(hidden, weight, bias, targets, with_grads=True)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):  # type: ignore[override]
        grads = ctx.saved_tensors
        scale = grad_loss.to(grads[0].dtype)
        bias_grad = grads[2] * scale.to(grads[2].dtype) if ctx.has_bias else None
        return grads[0] * scale, grads[1] * scale.to(grads[1].dtype), bias_grad, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum over rows of cross_entropy(hidden @ weight.T + bias, targets), correct argmax count)``,
    rows whose target is ``IGNORE_INDEX`` left out; ``hidden`` is ``(rows, d)``, ``weight``
    ``(vocabulary, d)``. The loss sum is differentiable in ``hidden``, ``weight`` and ``bias``."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not needs_grad:
        loss, correct, _ = _chunks(hidden, weight, bias, targets, with_grads=False)
        return loss, correct
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets)
