"""Toy objectives that use the hooks image SSL needs: an EMA teacher and a queue (auxiliary modules),
parameter groups with their own lr multipliers, a last layer frozen for the first steps, two views
per sample, and a context recorded at setup. Shared by the contract tests and the 2-process run."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from multissl.metrics import Mean
from multissl.training.objective import ParamGroup, TrainContext
from multissl.training.schedules import cosine_schedule
from tests.toy import Toy


@dataclass
class TwoViewCollator:
    """Two noisy views of each sample, as a list (views of one image at two crop sizes)."""

    def __call__(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, Any]:
        x = torch.stack([s["x"] for s in samples])
        views = [x + 0.01 * torch.randn(x.shape, generator=generator) for _ in range(2)]
        return {"views": views, "y": torch.stack([s["y"] for s in samples])}


class Queue(nn.Module):
    """A fixed-size buffer of past teacher outputs, enqueued in order (MoCo's queue, in small)."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("items", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> None:
        n, size = x.shape[0], self.items.shape[0]
        idx = (self.ptr + torch.arange(n, device=x.device)) % size
        self.items[idx] = x.to(self.items.dtype)
        self.ptr.copy_((self.ptr + n) % size)


class TeacherToy(Toy):
    """Regression on two views whose student also matches an EMA teacher's output; the teacher's
    momentum follows a cosine schedule over ``total_steps``, learned at setup."""

    name = "teacher-toy"

    def __init__(self, freeze_last_steps: int = 0, head_lr_multiplier: float = 1.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.teacher = copy.deepcopy(self.model)
        self.queue = Queue(32, 1)
        self.freeze_last_steps = freeze_last_steps
        self.head_lr_multiplier = head_lr_multiplier
        self.context: TrainContext | None = None
        self.setup_calls = 0
        self.updates = 0
        self.momenta: list[float] = []
        self.compute_models: dict[str, set[int]] = {"train": set(), "eval": set()}
        self.last_layer_seen: list[torch.Tensor] = []

    def collator(self) -> TwoViewCollator:
        return TwoViewCollator()

    def count(self, batch: dict[str, Any]) -> dict[str, float]:
        return {"samples": int(batch["y"].shape[0]), "views": 2 * int(batch["y"].shape[0])}

    def setup(self, context: TrainContext) -> None:
        self.context = context
        self.setup_calls += 1

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        body = [p for n, p in self.model.named_parameters() if not n.startswith("3.")]
        head = [p for n, p in self.model.named_parameters() if n.startswith("3.")]
        return [ParamGroup(body, "body"), ParamGroup(head, "head", lr_multiplier=self.head_lr_multiplier)]

    def auxiliary_modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, "queue": self.queue}

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        self.compute_models["train" if model.training else "eval"].add(id(model))
        if "views" not in batch:  # eval batches: plain samples
            return super().compute(model, batch)
        first, second = batch["views"]
        pred = model(first).squeeze(-1)
        with torch.no_grad():
            target = self.teacher(second).squeeze(-1)
        if model.training:
            self.queue.push(target[:, None])
        err = (pred - batch["y"]) ** 2 + 0.1 * (pred - target) ** 2
        if model.training and (self.steps_done + 1) in self.nan_at_steps:
            err = err * float("nan")
        return {"loss": Mean(err.sum(), err.numel())}

    def before_optimizer_step(self, model: nn.Module, step: int) -> None:
        super().before_optimizer_step(model, step)
        self.last_layer_seen.append(self.model[3].weight.detach().clone())
        if step < self.freeze_last_steps:  # DINO: the last layer learns nothing in its first epoch
            for p in self.model[3].parameters():
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module, step: int) -> dict[str, float]:
        self.updates += 1
        assert self.context is not None
        m = cosine_schedule(step - 1, self.context.total_steps, 0.9, 1.0)
        self.momenta.append(m)
        for t, s in zip(self.teacher.parameters(), self.model.parameters()):
            t.mul_(m).add_(s.detach(), alpha=1 - m)
        return {"teacher_momentum": m}

    def eval_collator(self) -> Any:
        from tests.toy import ToyCollator

        return ToyCollator(noise=0.0)
