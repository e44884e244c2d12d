"""Starting points for fine-tuning: a pretrained output (ours or any transformers folder or Hub id),
or the same architecture with fresh random weights (the from-scratch baseline of the lift report)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from multissl.errors import ConfigError, first_line


def resolve_model_dir(init_from: str) -> str:
    """A run folder means its exported ``model/``; a local folder must exist; anything else is a Hub id."""
    path = Path(init_from).expanduser()
    if (path / "model" / "config.json").is_file():
        return str(path / "model")
    if path.exists() or init_from.startswith((".", "/", "~")) or init_from.count("/") > 1:
        if not path.is_dir():
            raise ConfigError(f"model.init_from={init_from!r}: no such folder")
        if not (path / "config.json").is_file():
            hint = " (an open_clip model: it has no transformers config)" if (path / "open_clip_config.json").is_file() else ""
            raise ConfigError(f"model.init_from={init_from!r}: no config.json in this folder{hint}; give a "
                              "save_pretrained folder or a run's output_dir")
        return str(path)
    return init_from


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
