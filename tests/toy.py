"""A toy objective for trainer tests: noisy linear regression through a small MLP with dropout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multissl.metrics import Mean
from multissl.training.objective import Objective

TRUE_W = torch.linspace(-1, 1, 8)


def toy_data(n: int = 256) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 8, generator=g)
    y = x @ TRUE_W
    return [{"x": x[i], "y": y[i]} for i in range(n)]


@dataclass
class ToyCollator:
    """Stacks samples; training adds input noise drawn from the batch's generator."""

    noise: float

    def __call__(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        x = torch.stack([s["x"] for s in samples])
        if self.noise:
            x = x + self.noise * torch.randn(x.shape, generator=generator)
        return {"x": x, "y": torch.stack([s["y"] for s in samples])}


class Toy(Objective):
    """Collation draws noise from the batch generator; the model has dropout (global RNG)."""

    name = "toy"

    def __init__(self, nan_at_steps: set[int] | None = None, hook: Any = None, dropout: float = 0.1,
                 noise: float = 0.01) -> None:
        self.model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(dropout), nn.ReLU(), nn.Linear(32, 1))
        self.nan_at_steps = nan_at_steps or set()
        self.hook = hook
        self.noise = noise
        self.steps_done = 0
        self.calls = 0
        self.grads: list[dict[str, torch.Tensor]] = []
        """The final gradients of every real update (what the optimizer is about to apply)."""

    def collator(self) -> ToyCollator:
        return ToyCollator(noise=self.noise)

    def eval_collator(self) -> ToyCollator:
        return ToyCollator(noise=0.0)

    def count(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"samples": int(batch["x"].shape[0])}

    def compute(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        pred = model(batch["x"]).squeeze(-1)
        err = (pred - batch["y"]) ** 2
        if model.training and (self.steps_done + 1) in self.nan_at_steps:
            err = err * float("nan")
        return {"loss": Mean(err.sum(), err.numel()), "abs_err": (pred - batch["y"]).abs().mean()}

    def before_optimizer_step(self, model: nn.Module, step: int) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None})

    def on_step_end(self, step: int) -> dict[str, float]:
        self.steps_done = step
        if self.hook is not None:
            self.hook(step)
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = state["steps_done"]

    def save_pretrained(self, model: nn.Module, output_dir: Path) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), output_dir / "toy.pt")
