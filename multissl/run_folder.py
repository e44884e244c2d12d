"""A run's output folder and the model inside it: the one rule every command that takes
"a run or a model folder" (probe, push, fine-tuning's init_from) follows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from multissl.errors import ConfigError, MultiSSLError

MODEL_SUBDIR = "model"
MODEL_MARKERS = ("config.json", "open_clip_config.json")
"""A transformers/timm folder has config.json; an open_clip folder open_clip_config.json."""


@dataclass(frozen=True)
class ModelFolder:
    model_dir: Path
    run_dir: Path | None
    """The run that made it (has config.yaml, metrics.jsonl), when known."""


def find_model_folder(path: str | Path, error: type[MultiSSLError] = ConfigError) -> ModelFolder:
    """``path`` is a run's output_dir (its ``model/`` is the model) or a model folder itself; anything
    else raises ``error`` with one line naming the folder and what was expected."""
    path = Path(path).expanduser()
    if not path.exists():
        raise error(f"no such run or model folder: {path}")
    if not path.is_dir():
        raise error(f"{path} is a file; give a run's output_dir (with model/) or a model folder")
    if (path / MODEL_SUBDIR).is_dir():
        model_dir, run_dir = path / MODEL_SUBDIR, path
    else:
        model_dir = path
        run_dir = path.parent if (path.parent / "config.yaml").is_file() else None
    if not any((model_dir / name).is_file() for name in MODEL_MARKERS):
        if (path / "checkpoints").is_dir():
            raise error(f"{path} has checkpoints but no final model yet (model/): finish the run first "
                        "(run the same command again to resume it)")
        raise error(f"no model in {model_dir}: expected a run's output_dir (with model/) or a model folder "
                    f"(with {' or '.join(MODEL_MARKERS)})")
    return ModelFolder(model_dir, run_dir)


def looks_local(ref: str) -> bool:
    """Whether ``ref`` names a local path rather than a Hub id (``org/name``)."""
    return Path(ref).expanduser().exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1
