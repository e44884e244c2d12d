"""Starting points for fine-tuning: a pretrained output (ours or any transformers folder or Hub id),
or the same architecture with fresh random weights (the from-scratch baseline of the lift report)."""

from __future__ import annotations

from typing import Any

from multissl.errors import ConfigError, first_line
from multissl.run_folder import find_model_folder, looks_local
from multissl.training.objective import ModelCardInfo


def resolve_model_dir(init_from: str) -> str:
    """A run folder means its exported ``model/``; a local folder must hold a transformers model;
    anything else is a Hub id."""
    if not looks_local(init_from):
        return init_from
    try:
        folder = find_model_folder(init_from).model_dir
    except ConfigError as err:
        raise ConfigError(f"model.init_from={init_from!r}: {err}") from None
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.init_from={init_from!r}: {folder} holds an open_clip model, which has no "
                          f"transformers config; give a save_pretrained folder or a run's output_dir")
    return str(folder)


def finetuned_card(model: Any, method: str, base_model: str, **facts: Any) -> ModelCardInfo:
    """The card record every fine-tuning task shares: a transformers model, its size, its start."""
    cfg = model.config
    return ModelCardInfo(method=method, library_name="transformers", arch=cfg.model_type,
                         size=f"{cfg.num_hidden_layers} layers x {cfg.hidden_size}",
                         parameters=sum(p.numel() for p in model.parameters()), base_model=base_model,
                         fine_tuned=True, **facts)


def load_for_finetuning(auto_class: Any, init_from: str, random_init: bool, expected_types: tuple[str, ...] = (),
                        **config_kwargs: Any) -> tuple[Any, str]:
    """``(model, resolved source)``: ``auto_class`` loaded from ``init_from`` with ``config_kwargs``
    (labels, vocabulary, dropout) applied, or built from its config alone when ``random_init``."""
    from transformers import AutoConfig

    source = resolve_model_dir(init_from)
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as err:
        raise ConfigError(f"model.init_from={init_from!r}: cannot load a model config ({first_line(err)})") from None
    if expected_types and config.model_type not in expected_types:
        raise ConfigError(f"model.init_from={init_from!r} is a {config.model_type!r} model; this task needs "
                          f"{' or '.join(expected_types)}")
    for key, value in config_kwargs.items():
        setattr(config, key, value)
    try:
        if random_init:
            return auto_class.from_config(config), source
        # a head of another size (other labels or vocabulary) is made anew, as the config now says
        return auto_class.from_pretrained(source, config=config, ignore_mismatched_sizes=True), source
    except Exception as err:
        raise ConfigError(f"model.init_from={init_from!r}: cannot build {auto_class.__name__} ({first_line(err)})") from None
