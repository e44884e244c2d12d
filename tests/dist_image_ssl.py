"""Run under ``torchrun --nproc_per_node 2``: MoCo v2 (queue, key encoder, shuffling BN) or DINO
(teacher, centre) trains a few steps on each rank's share of the digits; each rank saves its
auxiliary state to ``OUT/<method>_rank<r>.pt`` for ``test_image_ssl`` to compare. One method per
launch (a finished run ends the process group). Kept out of pytest's collection (no ``test_`` prefix).

    torchrun --nproc_per_node 2 tests/dist_image_ssl.py OUT moco|dino
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

from multissl import config
from multissl.callbacks import recipe_trainer
from multissl.data.image_data import prepare_images
from tests.test_image_ssl import _args


def main(out: Path, method: str) -> None:
    recipe = importlib.import_module(f"multissl_recipes.{method}")
    extra = {"loss.queue_size": 48} if method == "moco" else {}
    cfg = config.load(getattr(recipe, {"moco": "MoCoConfig", "dino": "DINOConfig"}[method]),
                      _args(out / method, 3, method, **extra), recipe.DEFAULT_CONFIG)
    trainer = recipe_trainer(cfg)
    rank = trainer.accelerator.process_index
    train, held_out = prepare_images(cfg.data)
    objective = (recipe.MoCo(cfg.model, cfg.loss, augment=cfg.augment) if method == "moco"
                 else recipe.DINO(cfg.model, cfg.loss, cfg.local, augment=cfg.augment))
    seen: list[torch.Tensor] = []
    original = objective.collator()

    def spy(samples, generator, original=original):  # noqa: ANN001, ANN202 - the collator's signature
        batch = original(samples, generator)
        seen.append(batch["views"][0][:1].clone())
        return batch

    objective._collator = spy
    trainer.fit(objective, train, held_out)
    state = {name: {k: v.cpu() for k, v in m.state_dict().items()} for name, m in objective.auxiliary_modules().items()}
    torch.save({"state": state, "first_image": seen[0], "shuffles": getattr(objective, "shuffles", 0)},
               out / f"{method}_rank{rank}.pt")


if __name__ == "__main__":
    from multissl.cli import leave_process_group

    main(Path(sys.argv[1]), sys.argv[2])
    leave_process_group(0)  # as a recipe ends under torchrun: os._exit after flushing (gloo can abort on the way out)
