"""Model cards for every exported model (pushing to the Hub builds on this)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from multissl import config as config_lib

METHOD_TAGS = {"mlm": "masked-language-modeling", "clm": "causal-language-modeling"}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _data_source(data: dict[str, Any]) -> str:
    """What the model was trained on, as the config names it."""
    named = data.get("dataset") or ", ".join(data.get("files") or []) or data.get("manifest") or data.get("csv")
    return str(named) if named else "embedded demo corpus"


def write_model_card(model_dir: Path, objective: Any, state: Any, final_metrics: dict[str, Any],
                     run_config: Any, metrics_path: Path) -> Path:
    """Write ``README.md`` (YAML metadata + what was trained how + how to load) into ``model_dir``."""
    from huggingface_hub import ModelCard, ModelCardData

    info = objective.model_card_info()
    method = info.get("method", objective.name)
    numeric = {k.split("/", 1)[-1]: v for k, v in final_metrics.items() if isinstance(v, (int, float))}
    data = ModelCardData(
        library_name=info.get("library_name"),
        pipeline_tag=info.get("pipeline_tag") or None,
        tags=["multissl", "self-supervised", METHOD_TAGS.get(method, method)],
    )
    cfg = config_lib.to_dict(run_config) if run_config is not None else {}
    rows = [
        ("method", method),
        ("architecture", f"{info.get('arch', '?')} ({info.get('size', '?')})"),
        ("parameters", f"{info.get('parameters', 0) / 1e6:.2f}M"),
        ("optimizer steps", state.step),
        ("samples seen", state.samples_seen),
        *([("tokens seen", state.tokens_seen)] if state.tokens_seen else []),
        *([("audio seen", f"{state.seen['audio_seconds'] / 3600:.2f} h")] if state.seen.get("audio_seconds") else []),
        *[(f"{u.removeprefix('skipped_').replace('_', ' ')} skipped (bad input)", int(v))
          for u, v in state.seen.items() if u.startswith("skipped_") and v],
        ("training time", f"{state.train_seconds / 60:.1f} min"),
        ("hardware", _hardware()),
        ("data", _data_source(cfg.get("data", {}))),
    ]
    # a local card loads from this folder; pushing to the Hub rewrites it with the repo id
    usage = info.get("usage", "").replace("{repo}", str(model_dir))
    usage = usage.replace("{open_clip_ref}", f"local-dir:{model_dir}")
    lines = [
        f"# {model_dir.parent.name or 'multissl model'}",
        "",
        f"A {info.get('arch', '')} model pretrained from scratch with multissl's `{method}` recipe.",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in rows],
        "",
        "## Evaluation (held-out split, end of training)",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in sorted(numeric.items())],
        "",
        "## How to use",
        "",
        "```python",
        usage,
        "```",
        "",
        *([f"Or load the weights directly: `transformers.{info.get('auto_class', 'AutoModel')}.from_pretrained(...)`.", ""]
          if info.get("library_name") == "transformers" else []),
        "## Training configuration",
        "",
        "```json",
        json.dumps(cfg, indent=1),
        "```",
        "",
        "## Limitations",
        "",
        "A small model trained briefly on a small corpus: it shows the recipe works, not that it is useful for",
        "downstream tasks without further pretraining on more data.",
        "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = model_dir / "README.md"
    card.save(path)
    return path


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.machine()})"
