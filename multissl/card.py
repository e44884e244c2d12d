"""Model cards for every exported model: what was trained how, held-out metrics, the loss curve and
loading code that runs (written locally at export; a Hub push retargets the snippet to the repo)."""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path
from typing import Any

from multissl import config as config_lib
from multissl.training.objective import ModelCardInfo

LOSS_CURVE = "loss_curve.png"  # drawn next to the card, shown in it, pushed with it
METHOD_TAGS = {"mlm": "masked-language-modeling", "clm": "causal-language-modeling"}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _data_source(data: dict[str, Any]) -> str:
    """What the model was trained on, as the config names it."""
    named = data.get("dataset") or ", ".join(data.get("files") or []) or data.get("manifest") or data.get("csv")
    return str(named) if named else "embedded demo corpus"


def _hub_dataset_id(data: dict[str, Any]) -> str | None:
    """``data.dataset`` when it names a Hub dataset rather than a local folder."""
    named = data.get("dataset") or ""
    return named if named and not Path(named).expanduser().exists() and "://" not in named else None


def _eval_results(info: ModelCardInfo, metrics: dict[str, Any], dataset: str) -> list[Any]:
    """The model-index entries: the method's headline held-out metrics (``info.card_metrics``)."""
    from huggingface_hub import EvalResult

    task = info.pipeline_tag or "feature-extraction"
    return [
        EvalResult(task_type=task, dataset_type=dataset, dataset_name=dataset, dataset_split="held-out",
                   metric_type=metric, metric_name=metric, metric_value=round(float(metrics[metric]), 4))
        for metric in info.card_metrics if isinstance(metrics.get(metric), (int, float))
    ]


def write_model_card(model_dir: Path, info: ModelCardInfo, state: Any, final_metrics: dict[str, Any],
                     run_config: Any, metrics_path: Path) -> Path:
    """Write ``README.md`` (YAML metadata + what was trained how + how to load) into ``model_dir``."""
    from huggingface_hub import ModelCard, ModelCardData

    method = info.method
    numeric = {k.split("/", 1)[-1]: v for k, v in final_metrics.items() if isinstance(v, (int, float))}
    cfg = config_lib.to_dict(run_config) if run_config is not None else {}
    name = model_dir.parent.name or "multissl model"
    source = _data_source(cfg.get("data", {}))
    hub_id = _hub_dataset_id(cfg.get("data", {}))
    fine_tuned = info.fine_tuned
    base_model = info.base_model
    data = ModelCardData(
        library_name=info.library_name,
        pipeline_tag=info.pipeline_tag or None,
        tags=["multissl", "fine-tuned" if fine_tuned else "self-supervised", METHOD_TAGS.get(method, method)],
        base_model=base_model if _is_hub_id(base_model) else None,
        license=cfg.get("hub", {}).get("license") or None,
        datasets=[hub_id] if hub_id else None,
        model_name=name,
        eval_results=_eval_results(info, numeric, hub_id or source) or None,
    )
    rows = [
        ("method", method),
        ("architecture", f"{info.arch} ({info.size})"),
        ("parameters", f"{info.parameters / 1e6:.2f}M"),
        ("optimizer steps", state.step),
        ("samples seen", int(state.seen.get("samples", 0))),
        *([("tokens seen", int(state.seen["tokens"]))] if state.seen.get("tokens") else []),
        *([("audio seen", f"{state.seen['audio_seconds'] / 3600:.2f} h")] if state.seen.get("audio_seconds") else []),
        *[(f"{u.removeprefix('skipped_').replace('_', ' ')} skipped (bad input)", int(v))
          for u, v in state.seen.items() if u.startswith("skipped_") and v],
        ("training time", f"{state.train_seconds / 60:.1f} min"),
        ("hardware", _hardware()),
        ("data", source),
    ]
    # a local card loads from this folder; a push rewrites the snippet for the repo (retarget_card)
    usage = render_usage(info.usage, model_dir)
    from multissl.plots import loss_curve

    curve = loss_curve(metrics_path, model_dir / LOSS_CURVE)
    lines = [
        f"# {name}",
        "",
        _summary_line(info, method),
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
        *(["## Loss curve", "", f"![Training and held-out loss against optimizer steps]({LOSS_CURVE})", ""] if curve else []),
        *[line for file, caption in info.figures if (model_dir / file).is_file()
          for line in (f"## {caption.split(':')[0]}", "", f"![{caption}]({file})", "")],
        "## How to use",
        "",
        _usage_marker(model_dir),
        "```python",
        usage,
        "```",
        "",
        *([f"Or load the weights directly: `transformers.{info.auto_class}.from_pretrained(...)`.", ""]
          if info.library_name == "transformers" else []),
        "## Training configuration",
        "",
        "```json",
        json.dumps(cfg, indent=1),
        "```",
        "",
        "## Limitations",
        "",
        *(["A model fine-tuned on one labelled set: expect it to do well only on texts or audio like that set's,",
           "and check its held-out scores above before relying on it."] if fine_tuned else
          ["A small model trained briefly on a small corpus: it shows the recipe works, not that it is useful for",
           "downstream tasks without further pretraining on more data."]),
        "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = model_dir / "README.md"
    card.save(path)
    return path


def _is_hub_id(ref: str) -> bool:
    """``name`` or ``namespace/name`` that is not a local path: what the card's base_model may hold."""
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", ref or "")) and not Path(ref).expanduser().exists()


def _summary_line(info: ModelCardInfo, method: str) -> str:
    if not info.fine_tuned:
        return f"A {info.arch} model pretrained from scratch with multissl's `{method}` recipe."
    base = info.base_model
    start = f"the pretrained model `{base}`" if base else "random weights (no pretraining)"
    return f"A {info.arch} model fine-tuned for {info.pipeline_tag or method} with multissl's `{method}` task, from {start}."


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.machine()})"


# ------------------------------------------------------------------------------------- usage snippet
_USAGE_MARK = re.compile(r"<!-- multissl:usage (\{.*?\}) -->")


def render_usage(template: str, ref: str | Path) -> str:
    """A card's loading code for the model at ``ref``: a local folder (a ``Path``) or a Hub repo id (a ``str``).

    ``{repo}`` becomes what ``from_pretrained`` takes (the folder or the repo id) and ``{open_clip_ref}``
    what open_clip's ``create_model_and_transforms`` takes (``local-dir:<folder>`` or ``hf-hub:<repo id>``).
    """
    open_clip_ref = f"local-dir:{ref}" if isinstance(ref, Path) else f"hf-hub:{ref}"
    return template.replace("{open_clip_ref}", open_clip_ref).replace("{repo}", str(ref))


def _usage_marker(ref: str | Path) -> str:
    """An HTML comment (invisible on the Hub) recording where the card's snippet loads from."""
    return f"<!-- multissl:usage {json.dumps({'ref': str(ref), 'local': isinstance(ref, Path)})} -->"


def retarget_card(text: str, ref: str | Path) -> str:
    """``text`` (a card written by ``write_model_card``) with its loading snippet rewritten for ``ref``.

    Only the quoted references in the snippet change, so edits made to the snippet by hand survive.
    A card without multissl's marker is returned unchanged.
    """
    mark = _USAGE_MARK.search(text)
    if mark is None:
        return text
    old = json.loads(mark.group(1))
    old_ref: str | Path = Path(old["ref"]) if old.get("local") else str(old["ref"])
    start = text.find("```python\n", mark.end())
    body_start = start + len("```python\n")
    end = text.find("\n```", body_start - 1) if start >= 0 else -1
    if end < 0:
        return text
    code = text[body_start:end]
    # back to the template (references are always quoted in the snippets), then forward to the new ref
    template = code.replace(f'"{render_usage("{open_clip_ref}", old_ref)}"', '"{open_clip_ref}"')
    template = template.replace(f'"{old_ref}"', '"{repo}"')
    return text[: mark.start()] + _usage_marker(ref) + text[mark.end() : body_start] + render_usage(template, ref) + text[end:]


