"""Classical baselines for the lift report: what a task scores without any deep model.

A pretrained model pays off only if it beats both its from-scratch twin and a cheap classical model
fitted on the same labelled examples. Each baseline takes a fine-tuning run's resolved config (the
``config.yaml`` its trainer saved), loads that run's training subset and eval split with the task's
own data code, and scores the task's eval metrics computed as the task computes them. Baselines are
keyed by task name in `BASELINES`; a task without one has no baseline column. MFCC features (audio)
and raw pixels (images) can be added the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class BaselineResult:
    name: str
    """What was fitted, as the report names its column."""
    metrics: dict[str, float]
    """Held-out metrics under the task's names (e.g. accuracy, macro_f1)."""
    train_size: int


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy, macro-F1 and (two classes) Matthews correlation from the same per-class rates the
    fine-tuning task pools, through its own `summarize_classification`: the numbers compare."""
    from multissl.objectives.classification import summarize_classification

    n = max(len(labels), 1)
    rates = {"accuracy": float(np.mean(labels == predictions))}
    for c in range(num_labels):
        p, t = predictions == c, labels == c
        rates[f"_tp{c}"] = float(np.sum(p & t)) / n
        rates[f"_fp{c}"] = float(np.sum(p & ~t)) / n
        rates[f"_fn{c}"] = float(np.sum(~p & t)) / n
    return summarize_classification(rates, num_labels)


def _joined(rows: list[dict[str, Any]]) -> list[str]:
    """One string per row: a pair's two texts are joined (a bag of words has no sides)."""
    return [f"{r['text']}\n{r['text_pair']}" if "text_pair" in r else r["text"] for r in rows]


def tfidf_logistic_regression(run_config: dict[str, Any]) -> BaselineResult:
    """TF-IDF of word unigrams and bigrams (sublinear tf) into a logistic regression, on exactly the
    training subset and eval split that `load_labelled_text` gives the fine-tuning run."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from multissl.data.text_classification import TextClassificationDataConfig, load_labelled_text

    data = load_labelled_text(TextClassificationDataConfig(**run_config["data"]))
    y_train = np.array([r["label"] for r in data.train])
    y_eval = np.array([r["label"] for r in data.eval])
    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                          LogisticRegression(max_iter=1000))
    model.fit(_joined(data.train), y_train)
    predictions = model.predict(_joined(data.eval))
    metrics = classification_metrics(y_eval, predictions, data.labels.num_labels)
    return BaselineResult("TF-IDF + logistic regression", metrics, len(data.train))


Baseline = Callable[[dict[str, Any]], BaselineResult]
BASELINES: dict[str, Baseline] = {"text-classification": tfidf_logistic_regression}
"""Task name -> its classical baseline."""
