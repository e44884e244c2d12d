"""Classification metrics shared by the text and audio classification tasks, and the text task.

Accuracy, macro-F1 and (two classes) Matthews correlation are computed from per-class counts that
are summed over batches and processes, so they are exact whatever the split: each batch returns
the counts as ``Mean(count, batch size)`` and `summarize_classification` turns the pooled rates
into the scores (F1 and MCC are ratios, unchanged by the common scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multissl.data.labels import LabelMap
from multissl.metrics import Mean
from multissl.objectives.finetune import finetuned_card
from multissl.training.objective import ModelCardInfo, Objective


def classification_step(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, Any]:
    """Loss, accuracy and the per-class counts behind macro-F1/MCC for one batch."""
    n = labels.numel()
    loss = nn.functional.cross_entropy(logits.float(), labels)
    out: dict[str, Any] = {"loss": Mean(loss * n, n)}
    with torch.no_grad():
        pred = logits.argmax(-1)
        out["accuracy"] = Mean((pred == labels).sum().float(), n)
        for c in range(num_labels):
            p, t = pred == c, labels == c
            out[f"_tp{c}"] = Mean((p & t).sum().float(), n)
            out[f"_fp{c}"] = Mean((p & ~t).sum().float(), n)
            out[f"_fn{c}"] = Mean((~p & t).sum().float(), n)
    return out


def summarize_classification(metrics: dict[str, float], num_labels: int) -> dict[str, float]:
    """Replace the pooled per-class rates with macro-F1 (and MCC for two classes)."""
    rates = {k: metrics.pop(k) for k in list(metrics) if k.startswith("_")}
    if not rates:  # training logs: nothing pooled
        return metrics
    f1s = []
    for c in range(num_labels):
        tp, fp, fn = rates[f"_tp{c}"], rates[f"_fp{c}"], rates[f"_fn{c}"]
        denom = 2 * tp + fp + fn
        if denom > 0:  # a class absent from both labels and predictions does not count
            f1s.append(2 * tp / denom)
    metrics["macro_f1"] = sum(f1s) / len(f1s) if f1s else 0.0
    if num_labels == 2:
        tp, fp, fn = rates["_tp1"], rates["_fp1"], rates["_fn1"]
        tn = 1.0 - tp - fp - fn
        denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        metrics["matthews_correlation"] = (tp * tn - fp * fn) / denom if denom > 0 else 0.0
    return metrics


def prediction_rows(logits: torch.Tensor, labels: torch.Tensor, labels_map: LabelMap,
                    inputs: list[Any], input_key: str) -> list[dict[str, Any]]:
    """One JSON-able row per example: the input, the true and predicted label, the model's confidence."""
    probs = logits.float().softmax(-1)
    score, pred = probs.max(-1)
    return [
        {input_key: x, "label": labels_map.names[int(y)], "prediction": labels_map.names[int(p)], "score": round(float(s), 4)}
        for x, y, p, s in zip(inputs, labels.tolist(), pred.tolist(), score.tolist())
    ]


def labelled_step(logits: torch.Tensor, batch: dict[str, Any], labels_map: LabelMap, training: bool,
                  input_key: str = "path") -> dict[str, Any]:
    """A classification task's step output: loss and accuracy; in eval also the per-class counts
    (for macro-F1) and one prediction row per example, keyed by ``batch[input_key]``."""
    out = classification_step(logits, batch["labels"], labels_map.num_labels)
    if training:  # per-class counts only feed eval summaries (macro-F1): not train logs
        return {k: v for k, v in out.items() if not k.startswith("_")}
    out["predictions"] = prediction_rows(logits, batch["labels"], labels_map, batch[input_key], input_key)
    return out


@dataclass
class LabelledTextCollator:
    """Tokenized texts (or pairs) padded to the batch's longest, with their labels."""

    pad_id: int

    def __call__(self, samples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, Any]:
        longest = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(samples), longest), dtype=torch.long)
        types = torch.zeros((len(samples), longest), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            ids[i, :n] = torch.tensor(s["input_ids"])
            mask[i, :n] = 1
            if "token_type_ids" in s:
                types[i, :n] = torch.tensor(s["token_type_ids"])
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask,
                                 "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),
                                 "text": [s["text"] for s in samples]}
        if "token_type_ids" in samples[0]:
            batch["token_type_ids"] = types
        return batch


class TextClassification(Objective):
    """Sequence classification (single texts or pairs) with a transformers ``*ForSequenceClassification``."""

    name = "text-classification"
    best_metric = "accuracy"

    def __init__(self, model: nn.Module, tokenizer: Any, labels: LabelMap, base_model: str = "") -> None:
        self.model, self.tokenizer, self.labels = model, tokenizer, labels
        self.base_model = base_model
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collator(self) -> LabelledTextCollator:
        return LabelledTextCollator(self.pad_id)

    def count(self, batch: dict[str, Any]) -> dict[str, float]:
        return {"samples": int(batch["labels"].shape[0]), "tokens": int(batch["attention_mask"].sum())}

    def compute(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        logits = model(**inputs).logits
        out = classification_step(logits, batch["labels"], self.labels.num_labels)
        if not model.training:
            out["predictions"] = prediction_rows(logits, batch["labels"], self.labels, batch["text"], "text")
        return out

    def summarize(self, metrics: dict[str, float]) -> dict[str, float]:
        return summarize_classification(metrics, self.labels.num_labels)

    def save_pretrained(self, model: nn.Module, output_dir: Path) -> None:
        model.save_pretrained(output_dir)
        self.tokenizer.save_pretrained(output_dir)

    def model_card(self) -> ModelCardInfo:
        return finetuned_card(
            self.model, self.name, self.base_model, pipeline_tag="text-classification",
            card_metrics=("accuracy", "macro_f1", "matthews_correlation"),
            auto_class="AutoModelForSequenceClassification",
            usage=("from transformers import pipeline\n\n"
                   'classify = pipeline("text-classification", model="{repo}")\n'
                   'print(classify("The with statement wraps a block in a context manager."))'))
