"""DINO (Caron et al. 2021): self-distillation with no labels. A student sees 2 global and N local
crops and matches, on every crop, the EMA teacher's centred and sharpened output on the other global
crops. What keeps it from collapsing is the teacher's centring (a running mean of its outputs over
every process's batch) against its sharpening (a low temperature, warmed up from 0.04 to 0.07).

Training details kept from the paper: the student's last layer is frozen for the first epoch,
weight decay rises 0.04 -> 0.4 (``trainer.weight_decay_end``), gradients are clipped at 3, the
teacher's momentum rises 0.996 -> 1. The exported backbone is the teacher's, as the paper evaluates.
Local crops are smaller than global ones: a ViT backbone needs ``model.backbone.kwargs.dynamic_img_size=true``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from multissl.data.views import AugmentConfig, view_transform
from multissl.errors import ConfigError
from multissl.losses.dino import dino_loss, teacher_temperature, update_center
from multissl.models.backbones import BackboneConfig
from multissl.models.heads import DINOHead
from multissl.objectives.joint_embedding import (
    JointEmbedding,
    JointEmbeddingModel,
    MomentumConfig,
    feature_width,
    split_rows,
    target_of,
)
from multissl.training.objective import TrainContext


@dataclass
class DINOHeadConfig:
    out_dim: int = 65536
    """Prototypes (the output's width)."""
    hidden: int = 2048
    bottleneck: int = 256
    layers: int = 3
    batch_norm: bool = False
    """A BatchNorm after each hidden layer of the head (the authors' ``use_bn_in_head``). A ResNet's
    pooled features are non-negative and share most of their direction from image to image; without
    it the head passes that shared part on, every output points the same way, and the centred
    teacher turns uniform within tens of steps (DINO's uniform collapse): the tiny preset's ResNet needs it."""

    def __post_init__(self) -> None:
        if min(self.out_dim, self.hidden, self.bottleneck) < 1 or self.layers < 1:
            raise ConfigError("model.head widths and layers must be >= 1")


@dataclass
class DINOModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: DINOHeadConfig = field(default_factory=DINOHeadConfig)
    momentum: MomentumConfig = field(default_factory=lambda: MomentumConfig(base=0.996, final=1.0))
    freeze_last_layer_epochs: float = 1.0
    """The student's last layer gets no updates for this many epochs (steadier start)."""


@dataclass
class DINOLossConfig:
    student_temperature: float = 0.1
    teacher_temperature: float = 0.04
    """The teacher's temperature at the start of training..."""
    teacher_temperature_final: float = 0.07
    """...rising linearly to this over the first ``teacher_temperature_warmup`` of training."""
    teacher_temperature_warmup: float = 0.3
    """Share of the training steps (the paper: 30 of 100 epochs)."""
    center_momentum: float = 0.9

    def __post_init__(self) -> None:
        if min(self.student_temperature, self.teacher_temperature, self.teacher_temperature_final) <= 0:
            raise ConfigError("loss temperatures must be > 0")
        if not 0 <= self.teacher_temperature_warmup <= 1 or not 0 <= self.center_momentum < 1:
            raise ConfigError("loss.teacher_temperature_warmup must be in [0, 1] and loss.center_momentum in [0, 1)")


@dataclass
class LocalCropsConfig:
    """The small crops only the student sees."""

    count: int = 6
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(size=96, scale=(0.05, 0.4), blur=0.5))

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ConfigError(f"local.count must be >= 0, got {self.count}")


class Center(nn.Module):
    """The running mean of the teacher's outputs (a buffer: moved, checkpointed, equal on every process)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(1, dim))


class DINO(JointEmbedding):
    """Batches hold the 2 global crops first, then the local ones."""

    name = "dino"
    broadcast_buffers = False  # global and local crops are two forwards (the teacher's statistics are averaged)
    collapse_advice = ("lower loss.teacher_temperature_final, raise loss.center_momentum, lower trainer.lr, "
                       "or lengthen loss.teacher_temperature_warmup")

    def __init__(self, model: DINOModelConfig, loss: DINOLossConfig, local: LocalCropsConfig, **kwargs: Any) -> None:
        self.model_cfg, self.loss_cfg, self.local = model, loss, local
        super().__init__(model.backbone, **kwargs)
        self.target = target_of(self.model)
        self.momentum = model.momentum
        self.center = Center(model.head.out_dim)
        self.step, self.warmup_steps, self.freeze_steps = 0, 0, 0
        self._uniform_logs = 0

    def build_model(self, backbone: nn.Module) -> JointEmbeddingModel:
        h = self.model_cfg.head
        head = DINOHead(feature_width(backbone), h.out_dim, h.hidden, h.bottleneck, h.layers, h.batch_norm)
        return JointEmbeddingModel(backbone, head)

    def view_transforms(self) -> list[Any]:
        return [*super().view_transforms(), *[view_transform(self.local.augment)] * self.local.count]

    def setup(self, context: TrainContext) -> None:
        super().setup(context)
        self.warmup_steps = round(self.loss_cfg.teacher_temperature_warmup * context.total_steps)
        per_epoch = context.steps_per_epoch or 0
        self.freeze_steps = round(self.model_cfg.freeze_last_layer_epochs * per_epoch)

    def auxiliary_modules(self) -> dict[str, nn.Module]:
        return {**super().auxiliary_modules(), "center": self.center}

    def teacher_temperature(self) -> float:
        c = self.loss_cfg
        return teacher_temperature(self.step, self.warmup_steps, c.teacher_temperature, c.teacher_temperature_final)

    def loss(self, model: nn.Module, views: list[torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        assert self.target is not None
        n = views[0].shape[0]
        global_features, global_out, _ = model(torch.cat(views[:2]))
        student = split_rows(global_out, n, 2)
        if len(views) > 2:  # the local crops share a size: one forward for all of them
            student += split_rows(model(torch.cat(views[2:]))[1], n, len(views) - 2)
        with torch.no_grad():
            teacher = split_rows(self.target(torch.cat(views[:2]))[1], n, 2)
        center = self.center.center
        temperature = self.teacher_temperature()
        loss = dino_loss(student, teacher, center, self.loss_cfg.student_temperature, temperature)
        if model.training:  # a non-finite teacher output (fp16 overflow) must not poison the centre for good
            new = update_center(center, teacher, self.loss_cfg.center_momentum, self.gather)
            self.center.center.copy_(torch.where(torch.isfinite(new), new, center))
        with torch.no_grad():  # how peaked the teacher's targets are: its entropy falls as it sharpens
            probs = torch.softmax((teacher[0] - center) / temperature, dim=-1)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum() / max(n, 1)
        return {"loss": loss, "teacher_entropy": entropy}, global_features[:n]

    def before_optimizer_step(self, model: nn.Module, step: int) -> None:
        super().before_optimizer_step(model, step)
        if step < self.freeze_steps:
            for p in getattr(model, "module", model).projector.last_layer.parameters():
                p.grad = None

    def on_step_end(self, step: int) -> dict[str, float]:
        super().on_step_end(step)
        self.step = step
        return {"teacher_temperature": self.teacher_temperature()}

    def on_log(self, metrics: dict[str, float], step: int, warmup_steps: int) -> str | None:
        """The base class's warning, and one for DINO's own failure: a teacher whose centred targets
        are uniform (entropy near ln(out_dim)). The backbone's features can look spread out then,
        but the loss sits at ln(out_dim) and teaches nothing."""
        warnings = [super().on_log(metrics, step, warmup_steps)]
        entropy, share = metrics.get("teacher_entropy"), self.collapse.max_entropy_share
        if entropy is not None and step > warmup_steps and share > 0:
            ceiling = math.log(self.model_cfg.head.out_dim)
            self._uniform_logs = self._uniform_logs + 1 if entropy > share * ceiling else 0
            if self._uniform_logs >= self.collapse.patience:
                self._uniform_logs = 0  # once per patience window
                warnings.append(
                    f"step {step}: the dino teacher's targets are uniform: entropy {entropy:.2f} of at most "
                    f"ln({self.model_cfg.head.out_dim}) = {ceiling:.2f}, so the loss teaches nothing; on a ResNet "
                    f"set model.head.batch_norm=true, else lower trainer.lr, raise model.momentum.base, or lower "
                    f"loss.teacher_temperature_final")
        return " Also: ".join(w for w in warnings if w) or None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.step = int(state.get("step", 0))

    def export(self, model: nn.Module) -> nn.Module:
        """The teacher's backbone: what DINO evaluates and ships."""
        assert self.target is not None
        return self.target.backbone
