"""Run under ``torchrun --nproc_per_node 2``: one wav2vec 2.0 backward step through the trainer's
loss normalisation and DDP, with processes holding different numbers of masked frames.

Saves rank 0's gradients; ``test_wav2vec2_recipe`` compares them with one process's gradients of
the same loss over both batches. Kept out of pytest's collection (no ``test_`` prefix).

    torchrun --nproc_per_node 2 tests/dist_wav2vec2_grads.py MANIFEST OUT.pt
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any

import torch

from multissl.data.audio import AudioDataConfig
from multissl.data.audio_splits import prepare_audio
from multissl.objectives.wav2vec2 import Wav2Vec2LossConfig, Wav2Vec2ModelConfig, Wav2Vec2Pretraining


def build_objective(manifest: str) -> tuple[Wav2Vec2Pretraining, list[dict[str, torch.Tensor]]]:
    """The same initial model everywhere, and two batches of 1 and 3 utterances (uneven masked frames).

    Diversity and feature penalties are off: they are per-batch nonlinear terms, so only the
    contrastive sum splits exactly across processes.
    """
    data, _ = prepare_audio(AudioDataConfig(manifest=manifest, max_seconds=2.0, validation_fraction=0))
    rows = [data[i] for i in range(4)]
    torch.manual_seed(0)
    loss = Wav2Vec2LossConfig(num_negatives=10, diversity_weight=0.0, feature_penalty_weight=0.0)
    objective = Wav2Vec2Pretraining(Wav2Vec2ModelConfig(size="tiny", dropout=0.0), loss, data.collator())
    batches = [objective.collator()(rows[:1], torch.Generator().manual_seed(1)),
               objective.collator()(rows[1:], torch.Generator().manual_seed(2))]
    return objective, batches


def loss_of(objective: Wav2Vec2Pretraining, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
            index: int) -> Any:
    """Batch ``index``'s loss, with the quantizer's Gumbel noise drawn from a seed of its own (the
    model stays in training mode: in eval mode the quantizer's projection gets no gradient, and DDP
    would leave its bucket unreduced)."""
    torch.manual_seed(100 + index)
    return objective.compute(model, batches[index])["loss"]


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def main(argv: list[str]) -> Any:
    from multissl.training.trainer import Trainer, TrainerConfig

    manifest, out = argv
    trainer = Trainer(TrainerConfig(output_dir=tempfile.mkdtemp(), trackers=[], progress_bar=False))
    acc = trainer.accelerator
    objective, batches = build_objective(manifest)
    model = acc.prepare(objective.model)
    acc.backward(trainer._backward_loss(loss_of(objective, model, batches, acc.process_index)))
    if acc.is_main_process:
        torch.save(grads(acc.unwrap_model(model)), out)
    acc.wait_for_everyone()


if __name__ == "__main__":
    from multissl.cli import leave_process_group

    main(sys.argv[1:])
    leave_process_group(0)  # as a recipe ends under torchrun: os._exit after flushing (gloo can abort on the way out)
