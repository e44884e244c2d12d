"""What every joint-embedding image-SSL method shares (SimCLR, MoCo, BYOL, SimSiam, Barlow Twins,
VICReg, DINO), so each method's module holds only its heads, its loss and its teacher.

* the model: a timm backbone (what is exported) + a projector (+ a predictor), `JointEmbeddingModel`;
* the data: augmented views built in DataLoader workers (`multissl.data.views`); a bad image is a
  counted skip (each file once, across a resume), and a batch whose images are all bad is a batch of
  no rows, which trains nothing and, under several processes, still joins every collective;
* the exported model, its features for probes, the model card (timm's Hub format);
* collapse diagnostics on every batch: the per-dimension std of the L2-normalised backbone features
  (x sqrt(dim): ~1 for spread-out features, 0 when every image maps to one point; SimSiam's
  paper plots the same) and their effective rank (RankMe, Garrido et al. 2023), with a warning and
  advice when they collapse after warm-up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multissl.data.views import AugmentConfig, ViewsCollator, view_transform
from multissl.errors import ConfigError
from multissl.metrics import Mean
from multissl.models.backbones import (
    BackboneConfig,
    build_backbone,
    eval_transform_of,
    save_backbone,
    set_preprocessing,
)
from multissl.models.ema import cosine_momentum, ema_update, momentum_copy
from multissl.training.distributed import (
    StepRows,
    average_buffers,
    kept_buffers,
    rows_before,
)
from multissl.training.objective import ModelCardInfo, Objective, StepOutput, TrainContext
from multissl.training.skips import BadInputs


@dataclass
class CollapseConfig:
    """When the collapse warning fires."""

    min_std: float = 0.1
    """Warn when the normalised features' std x sqrt(dim) stays below this (0 = warning off)."""
    patience: int = 3
    """...for this many consecutive log intervals after warm-up."""
    max_entropy_share: float = 0.97
    """DINO: warn when the teacher's entropy stays above this share of its maximum, ln(out_dim): its
    targets are then uniform, whatever the backbone's std says (0 = warning off)."""

    def __post_init__(self) -> None:
        if self.min_std < 0 or self.patience < 1:
            raise ConfigError("collapse.min_std must be >= 0 and collapse.patience >= 1")
        if not 0 <= self.max_entropy_share <= 1:
            raise ConfigError(f"collapse.max_entropy_share must be in [0, 1], got {self.max_entropy_share}")


@dataclass
class MomentumConfig:
    """An EMA target's momentum: ``base`` at the start, raised to ``final`` along a half cosine."""

    base: float = 0.996
    final: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.base <= self.final <= 1.0:
            raise ConfigError(f"momentum must satisfy 0 <= base <= final <= 1, got {self.base}, {self.final}")


STAND_IN_ROWS = 2
"""Blank images a batch of no rows is forwarded as (two: a batch norm over one row fails in training)."""


class JointEmbeddingModel(nn.Module):
    """``forward(images) -> (features, projections, predictions or None)``; only ``backbone`` is exported.

    A batch of no images (all bad) gives outputs of no rows that still depend on every parameter:
    it is forwarded as `STAND_IN_ROWS` blank images whose outputs are cut to none and whose batch-norm
    statistics are put back. So the losses see an empty batch (and score it as nothing), while a
    process that has no images still runs DDP's forward and backward with the others (many backbones,
    ViTs among them, cannot forward zero rows at all)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if images.shape[0] == 0:
            with kept_buffers(self):
                features, projections, predictions = self._forward(images.new_zeros((STAND_IN_ROWS, *images.shape[1:])))
            return features[:0], projections[:0], predictions[:0] if predictions is not None else None
        return self._forward(images)

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        features = self.backbone(images)
        projections = self.projector(features)
        return features, projections, self.predictor(projections) if self.predictor is not None else None


def target_of(model: JointEmbeddingModel) -> JointEmbeddingModel:
    """An EMA target of ``model``: copies of its backbone and projector, no predictor (BYOL, MoCo, DINO)."""
    return JointEmbeddingModel(momentum_copy(model.backbone), momentum_copy(model.projector))


def feature_width(backbone: nn.Module) -> int:
    width = getattr(backbone, "num_features", None)
    if not isinstance(width, int):
        raise ConfigError(f"{type(backbone).__name__} does not say its feature width (num_features)")
    return width


def effective_rank(x: torch.Tensor) -> torch.Tensor:
    """RankMe: ``exp`` of the entropy of the normalised singular values of ``x`` (N, D); 1 when all
    rows are one direction, min(N, D) when every direction is used alike."""
    s = torch.linalg.svdvals(x.float())
    p = s / s.sum().clamp_min(1e-12) + 1e-7
    return torch.exp(-(p * p.log()).sum())


def collapse_metrics(features: torch.Tensor) -> dict[str, torch.Tensor]:
    """``embedding_std`` (std over the batch of the L2-normalised features, mean over dimensions, x
    sqrt(dim)) and ``effective_rank`` of a batch of features, without gradients."""
    with torch.no_grad():
        f = features.detach().float()
        z = nn.functional.normalize(f, dim=1)
        std = z.std(0).mean() * math.sqrt(z.shape[1]) if len(z) > 1 else torch.zeros((), device=z.device)
        return {"embedding_std": std, "effective_rank": effective_rank(f)}


class JointEmbedding(Objective):
    """Base of the joint-embedding methods. Batches are ``{"views": [v1, v2, ...], "labels", "skipped",
    "skipped_ids"}`` (`multissl.data.views.ViewsCollator`), of no rows when every image was bad.

    Subclasses build their model in ``build_model(backbone)`` and compute their loss in
    ``loss(model, views)``, returning ``(outputs, features)``: the loss and metrics (tensors are
    batch means, finite for a batch of no rows) and the backbone features of the first view for the
    collapse diagnostics. Methods with an EMA target set ``self.target`` and ``self.momentum`` and
    get its update for free. Losses that gather over processes pass ``training_offset`` where rows
    of this process start: processes hold different numbers of rows once bad images are dropped.

    A step with no rows on any process (every image of it bad) is not taken: the gradients are
    dropped before the optimizer runs, so neither the weights nor AdamW's moments, step count or
    weight decay move, and the EMA target stays; the trainer still counts the step (schedules go on)."""

    modality = "image"
    card_metrics: tuple[str, ...] = ("loss",)
    collapse_advice = "lower trainer.lr, lengthen trainer.warmup_ratio, or use a larger batch"

    def __init__(self, backbone: BackboneConfig, augment: AugmentConfig, on_bad_image: str = "skip",
                 max_image_pixels: int = 64_000_000, collapse: CollapseConfig | None = None) -> None:
        self.backbone_cfg, self.augment = backbone, augment
        self.collapse = collapse or CollapseConfig()
        net = build_backbone(backbone)
        set_preprocessing(net, augment.size, augment.mean, augment.std)
        self.eval_tf = eval_transform_of(net)  # probes see what users of the saved folder will
        self.model = self.build_model(net)
        self._collator = ViewsCollator(self.view_transforms(), on_bad_image, max_image_pixels, allow_empty=True)
        self.step_rows = StepRows()
        self.target: JointEmbeddingModel | None = None
        self.momentum: MomentumConfig | None = None
        self.rank, self.world_size, self.total_steps = 0, 1, 1
        self.device = torch.device("cpu")
        self.gather: Any = None
        self._low_std_logs = 0

    # ------------------------------------------------------------------ to override
    def build_model(self, backbone: nn.Module) -> JointEmbeddingModel:
        raise NotImplementedError

    def view_transforms(self) -> list[Any]:
        """One transform per view; two views of ``augment`` by default (the second with its ``second_view_*``)."""
        return [view_transform(self.augment.view(0)), view_transform(self.augment.view(1))]

    def loss(self, model: nn.Module, views: list[torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ the objective
    def collator(self) -> ViewsCollator:
        return self._collator

    def count(self, batch: dict[str, Any]) -> dict[str, float | BadInputs]:
        """Usable images, and the ids of the bad ones (``skipped_images``: the trainer counts each file once)."""
        return {"samples": int(batch["labels"].shape[0]), "skipped_images": BadInputs.of(batch)}

    def setup(self, context: TrainContext) -> None:
        self.rank, self.world_size, self.gather = context.rank, context.world_size, context.gather
        self.total_steps = context.total_steps
        self.device = context.device

    def training_gather(self, model: nn.Module) -> Any:
        """Gather over processes while training (every process steps together); eval batches can be
        uneven across processes, so each is scored on its own."""
        return self.gather if model.training else None

    def training_offset(self, model: nn.Module, rows: int) -> int:
        """Where this process's ``rows`` start in `training_gather`'s result (0 when it does not
        gather). A collective while training under several processes: call it on every process."""
        if not model.training or self.gather is None or self.world_size == 1:
            return 0
        return rows_before(rows, self.device)

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        if self.target is not None:
            self.target.train(model.training)  # batch statistics while training, running ones in eval
        outputs, features = self.loss(model, batch["views"])
        n = int(batch["labels"].shape[0])
        if model.training:
            self.step_rows.add(n)
        out: StepOutput = {k: v if isinstance(v, Mean) else Mean(v * n, n) for k, v in outputs.items()}
        out.update({k: Mean(v * n, n) for k, v in collapse_metrics(features).items()})
        return out

    def auxiliary_modules(self) -> dict[str, nn.Module]:
        return {"target": self.target} if self.target is not None else {}

    def current_momentum(self, step: int) -> float:
        assert self.momentum is not None
        return cosine_momentum(step, self.total_steps, self.momentum.base, self.momentum.final)

    def before_optimizer_step(self, model: nn.Module, step: int) -> None:
        if self.step_rows.none_anywhere(self.device):
            StepRows.drop_gradients(model)

    def after_optimizer_step(self, model: nn.Module, step: int) -> dict[str, float]:
        if self.target is None:
            return {}
        online = getattr(model, "module", model)  # under DDP, the wrapped model
        m = self.current_momentum(step)
        if self.step_rows.empty:  # the online network did not move: neither does its target
            return {"momentum": m}
        ema_update(self.target.backbone, online.backbone, m)
        ema_update(self.target.projector, online.projector, m)
        average_buffers(self.target)  # its batch-norm statistics saw only this process's batches
        return {"momentum": m}

    def on_step_end(self, step: int) -> dict[str, float]:
        self.step_rows.reset()
        return {}

    def on_log(self, metrics: dict[str, float], step: int, warmup_steps: int) -> str | None:
        std = metrics.get("embedding_std")
        if std is None or step <= warmup_steps or self.collapse.min_std <= 0:
            return None
        self._low_std_logs = self._low_std_logs + 1 if std < self.collapse.min_std else 0
        if self._low_std_logs < self.collapse.patience:
            return None
        self._low_std_logs = 0  # once per patience window
        rank = metrics.get("effective_rank", float("nan"))
        return (f"step {step}: the {self.name} features are collapsing: std of the normalised features x sqrt(dim) "
                f"{std:.3f} < {self.collapse.min_std} (about 1 when spread out) and effective rank {rank:.1f}; "
                f"the loss can still fall while nothing useful is learned: {self.collapse_advice}")

    # ------------------------------------------------------------------ output
    def export(self, model: nn.Module) -> nn.Module:
        return getattr(getattr(model, "module", model), "backbone", model)

    def features(self, model: nn.Module, inputs: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        from multissl.models.features import image_features

        return image_features(self.export(model), self.eval_tf, inputs, batch_size, pooled=True)

    def save_pretrained(self, model: nn.Module, output_dir: Path) -> None:
        save_backbone(model, output_dir)

    def model_card(self) -> ModelCardInfo:
        backbone = self.export(self.model)
        return ModelCardInfo(
            method=self.name, arch=self.backbone_cfg.name, size=self.backbone_cfg.size,
            parameters=sum(p.numel() for p in backbone.parameters()), library_name="timm",
            pipeline_tag="image-feature-extraction", card_metrics=self.card_metrics, auto_class="timm",
            usage=("import timm\n\n"
                   'model = timm.create_model("{open_clip_ref}", pretrained=True).eval()\n'
                   "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))\n"
                   "features = model(transform(pil_image.convert(\"RGB\")).unsqueeze(0))  # (1, num_features)"))


def split_rows(x: torch.Tensor, rows: int, parts: int) -> list[torch.Tensor]:
    """``x`` cut into ``parts`` blocks of ``rows`` rows (the views of one forward); unlike
    ``Tensor.split``, also ``parts`` empty blocks when ``rows`` is 0 (a batch of bad images)."""
    return [x[i * rows : (i + 1) * rows] for i in range(parts)]


def two_views(model: nn.Module, views: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor], list[Any]]:
    """Both views through ``model`` in one forward (batch-norm statistics over both, as the papers'
    code does): ``(features of view 1, [proj1, proj2], [pred1, pred2] or [None, None])``."""
    v1, v2 = views[0], views[1]
    features, proj, pred = model(torch.cat([v1, v2]))
    n = v1.shape[0]
    return features[:n], split_rows(proj, n, 2), split_rows(pred, n, 2) if pred is not None else [None, None]


@torch.no_grad()
def target_projections(target: JointEmbeddingModel, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """The EMA target's projections of each view (no gradients)."""
    n = views[0].shape[0]
    _, proj, _ = target(torch.cat(views))
    return split_rows(proj, n, len(views))


@dataclass
class HeadConfig:
    """A projector's (or predictor's) hidden and output widths."""

    hidden: list[int] = field(default_factory=lambda: [2048])
    out: int = 128

    def __post_init__(self) -> None:
        if self.out < 1 or any(h < 1 for h in self.hidden):
            raise ConfigError(f"head widths must be >= 1, got hidden={self.hidden}, out={self.out}")

    def dims(self, in_dim: int) -> list[int]:
        return [in_dim, *self.hidden, self.out]
