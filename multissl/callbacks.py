"""The callbacks every recipe attaches: a frozen-feature probe at each evaluation, the model card at
export, and the Hub push at the end. The trainer runs them without knowing what they do."""

from __future__ import annotations

from typing import Any

from torch import nn

from multissl.hub import HubConfig
from multissl.probe import ProbeConfig
from multissl.training.callbacks import Callback, Export
from multissl.training.objective import Objective
from multissl.training.trainer import Trainer


class ProbeCallback(Callback):
    """``probe/linear_acc``, ``probe/knn_acc`` and ``probe/chance`` of the objective's features."""

    def __init__(self, cfg: ProbeConfig) -> None:
        self.cfg = cfg
        self._warned = False

    def on_evaluate(self, trainer: Trainer, objective: Objective, model: nn.Module) -> dict[str, Any]:
        if not self.cfg.task:
            return {}
        if objective.modality is None:
            if not self._warned:
                trainer.print(f"warning: probe.task={self.cfg.task!r} is ignored: {objective.name} has no encoder to probe")
                self._warned = True
            return {}
        from multissl.probe import probe_encoder

        metrics, _ = probe_encoder(model, objective.modality,
                                   lambda xs: objective.features(model, xs, self.cfg.batch_size), self.cfg)
        return {f"probe/{k}": v for k, v in metrics.items()}


class ModelCardCallback(Callback):
    """``README.md`` beside the exported model, with its loss curve."""

    def on_export(self, trainer: Trainer, objective: Objective, export: Export) -> None:
        from multissl.card import write_model_card

        write_model_card(export.model_dir, objective.model_card(), export.state, export.final_metrics,
                         export.run_config, export.metrics_path)


class HubPushCallback(Callback):
    """Upload the exported model. A failure is a one-line warning, never a failed run: the model is
    saved, and ``multissl push`` can upload it later."""

    def __init__(self, cfg: HubConfig) -> None:
        self.cfg = cfg

    def on_fit_end(self, trainer: Trainer, objective: Objective, export: Export) -> None:
        if not self.cfg.push:
            return
        from multissl.hub import push_failure_warning, push_to_hub

        hub = self.cfg
        try:
            result = push_to_hub(export.output_dir, hub.repo_id, private=hub.private, revision=hub.revision,
                                 commit_message=hub.commit_message, exist_ok=True)
        except Exception as err:  # whatever went wrong, the trained model must not be lost to it
            trainer.print(push_failure_warning(err, hub, export.output_dir))
            return
        what = f"commit {result.commit[:10]}" if result.changed else "unchanged, no new commit"
        trainer.print(f"pushed {export.model_dir} to {result.url} (branch {result.revision}, {what})")


def standard_callbacks(run_config: Any) -> list[Callback]:
    """The probe (``probe.*``), the model card and the Hub push (``hub.*``) of a recipe's config."""
    probe = getattr(run_config, "probe", None) or ProbeConfig()
    hub = getattr(run_config, "hub", None) or HubConfig()
    return [ProbeCallback(probe), ModelCardCallback(), HubPushCallback(hub)]


def recipe_trainer(run_config: Any) -> Trainer:
    """The trainer a recipe runs: ``run_config.trainer`` with the standard callbacks attached."""
    return Trainer(run_config.trainer, run_config=run_config, callbacks=standard_callbacks(run_config))
