"""MoCo v2 (Chen et al. 2020) and v3 (Chen, Xie and He 2021): a momentum key encoder, contrastive.

* v2: the query encoder's projection of view 1 against the key encoder's of view 2 (its positive)
  and a queue of earlier keys (the negatives); the keys of every process are enqueued, in rank
  order, so the queue is the same everywhere. ``loss.symmetric`` adds the swapped pair.
* v3: no queue; a predictor on the query side, the keys of the whole (gathered) batch as
  negatives, symmetric, the loss scaled by ``2 x temperature`` as in the paper; the momentum rises
  from 0.99 to 1 along a cosine.

Under several processes v2's key encoder sees the batch shuffled across processes (the paper's
"shuffling BN"), so batch-norm statistics cannot tell a query's own key from the others. On one
process its batch norm already sees the whole batch and there is nothing to shuffle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from multissl.errors import ConfigError
from multissl.losses.info_nce import enqueue, info_nce
from multissl.metrics import Mean
from multissl.models.backbones import BackboneConfig
from multissl.models.heads import mlp
from multissl.objectives.joint_embedding import (
    HeadConfig,
    JointEmbedding,
    JointEmbeddingModel,
    MomentumConfig,
    feature_width,
    split_rows,
    target_of,
    two_views,
)
from multissl.training.distributed import rows_before


@dataclass
class MoCoModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    version: Literal[2, 3] = 2
    projector: HeadConfig = field(default_factory=lambda: HeadConfig(hidden=[2048], out=128))
    """v2: Linear-ReLU-Linear to 128 (no batch norm); v3: 4096-4096-256 with batch norms."""
    predictor: HeadConfig = field(default_factory=lambda: HeadConfig(hidden=[4096], out=256))
    """v3 only: the query side's predictor (its output width must equal the projector's)."""
    momentum: MomentumConfig = field(default_factory=lambda: MomentumConfig(base=0.999, final=0.999))
    """v2: a constant 0.999; v3: 0.99 -> 1 (cosine)."""


@dataclass
class MoCoLossConfig:
    temperature: float = 0.2
    """v2 0.2; v3 0.2 for ViTs, 1.0 for ResNets."""
    queue_size: int = 65536
    """v2: keys kept as negatives (a multiple of the global batch is tidiest; any size works)."""
    symmetric: bool = False
    """v2: also score view 2's query against view 1's key (v3 always does)."""

    def __post_init__(self) -> None:
        if not self.temperature > 0 or self.queue_size < 1:
            raise ConfigError("loss.temperature must be > 0 and loss.queue_size >= 1")


class KeyQueue(nn.Module):
    """The ring buffer of normalised keys (a buffer, so it moves to the device and is checkpointed)."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("keys", nn.functional.normalize(torch.randn(size, dim, generator=g), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> bool:
        """Enqueue ``keys`` unless any is non-finite (a step the trainer will skip must not leave NaN
        negatives behind); returns whether they were enqueued."""
        if not bool(torch.isfinite(keys).all()):
            return False
        self.ptr.fill_(enqueue(self.keys, int(self.ptr), nn.functional.normalize(keys.float(), dim=1)))
        return True


class MoCo(JointEmbedding):
    name = "moco"
    card_metrics = ("contrastive_accuracy", "loss")

    def __init__(self, model: MoCoModelConfig, loss: MoCoLossConfig, **kwargs: Any) -> None:
        self.model_cfg, self.loss_cfg = model, loss
        if model.version == 3 and model.predictor.out != model.projector.out:
            raise ConfigError(f"model.predictor.out ({model.predictor.out}) must equal model.projector.out "
                              f"({model.projector.out}): the predictor maps into the projector's space")
        super().__init__(model.backbone, **kwargs)
        self.target = target_of(self.model)
        self.momentum = model.momentum
        self.queue = KeyQueue(loss.queue_size, model.projector.out) if model.version == 2 else None
        self.shuffles = 0

    def build_model(self, backbone: nn.Module) -> JointEmbeddingModel:
        cfg = self.model_cfg
        dims = cfg.projector.dims(feature_width(backbone))
        if cfg.version == 2:
            return JointEmbeddingModel(backbone, mlp(dims, batch_norm=False))
        projector = mlp(dims, last_batch_norm=True, last_affine=False)
        return JointEmbeddingModel(backbone, projector, mlp(cfg.predictor.dims(cfg.projector.out),
                                                            last_batch_norm=True, last_affine=False))

    def auxiliary_modules(self) -> dict[str, nn.Module]:
        return {**super().auxiliary_modules(), **({"queue": self.queue} if self.queue is not None else {})}

    @torch.no_grad()
    def _keys(self, images: torch.Tensor, shuffle: bool) -> torch.Tensor:
        """The key encoder's projections of ``images`` (this process's rows)."""
        assert self.target is not None
        if not (shuffle and self.world_size > 1 and self.gather is not None):
            return self.target(images)[1]
        # shuffling BN: the key encoder sees a random share of the global batch, by a permutation
        # every process draws alike (seeded by a count of shuffles, kept across a resume); each
        # process encodes as many images as it holds (processes may hold different numbers)
        rows = len(images)
        start = rows_before(rows, images.device)
        everything = self.gather(images)
        self.shuffles += 1
        perm = torch.randperm(len(everything), generator=torch.Generator().manual_seed(self.shuffles))
        mine = perm[start : start + rows].to(images.device)
        keys = self.gather(self.target(everything[mine])[1])  # row j is the key of image perm[j]
        unshuffled = torch.empty_like(keys)
        unshuffled[perm.to(keys.device)] = keys
        return unshuffled[start : start + rows]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "shuffles": self.shuffles}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.shuffles = int(state.get("shuffles", 0))

    def loss(self, model: nn.Module, views: list[torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        t = self.loss_cfg.temperature
        symmetric = self.loss_cfg.symmetric or self.queue is None
        if symmetric:
            features, (z1, z2), (p1, p2) = two_views(model, views)
        else:  # v2 as in the paper: only view 1 is a query
            features, z1, _ = model(views[0])
            z2 = None
        n = z1.shape[0]
        if self.queue is not None:
            keys = self._keys(torch.cat([views[1], views[0]]) if symmetric else views[1], shuffle=model.training)
            k2, k1 = (keys[:n], keys[n:]) if symmetric else (keys, None)
            queue = self.queue.keys.clone()
            pairs = [(z1, k2), (z2, k1)] if symmetric else [(z1, k2)]
            results = [info_nce(q, k, t, queue=queue) for q, k in pairs]
            loss = sum(r[0] for r in results) / len(results)
            if model.training:  # the newest keys of every process, in rank order, the same everywhere
                gather = self.gather or (lambda x: x)
                self.queue.push(gather(keys))
        else:
            k1, k2 = split_rows(self._keys(torch.cat(views[:2]), shuffle=False), n, 2)
            gather, offset = self.training_gather(model), self.training_offset(model, n)
            results = [info_nce(p1, k2, t, gather=gather, offset=offset), info_nce(p2, k1, t, gather=gather, offset=offset)]
            loss = 2 * t * (results[0][0] + results[1][0])
        correct = sum(r[1] for r in results)
        return {"loss": loss, "contrastive_accuracy": Mean(correct.float(), n * len(results))}, features
