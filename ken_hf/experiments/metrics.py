"""Metrics through ``evaluate`` that also work offline.

``evaluate.load("accuracy")`` fetches a metric script from the Hub, which fails without a
network. ``load_metric`` tries exactly that first (so Hub metrics, cached or online, work
as usual) and otherwise falls back to built-in ``evaluate.Metric`` implementations of the
common classification metrics.
"""

from __future__ import annotations

from collections.abc import Callable

import datasets
import evaluate
import numpy as np


class _LocalMetric(evaluate.Metric):
    """A classification metric computed here, with evaluate's usual interface."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=f"{type(self).__name__} (ken-hf built-in, for when the Hub is unreachable)",
            citation="",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )


class Accuracy(_LocalMetric):
    def _compute(self, predictions, references):
        return {"accuracy": float((np.asarray(predictions) == np.asarray(references)).mean())}


class F1(_LocalMetric):
    """Binary F1 of the positive class (label 1), as evaluate's ``f1`` by default."""

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        true_positive = int(((predictions == 1) & (references == 1)).sum())
        predicted, actual = int((predictions == 1).sum()), int((references == 1).sum())
        denominator = predicted + actual
        return {"f1": 2 * true_positive / denominator if denominator else 0.0}


BUILTIN = {"accuracy": Accuracy, "f1": F1}


def load_metric(name: str) -> evaluate.EvaluationModule:
    """``evaluate.load(name)``, or the built-in ``name`` when the Hub cannot be reached."""
    try:
        return evaluate.load(name)
    except (FileNotFoundError, ConnectionError, OSError) as error:
        if name not in BUILTIN:
            raise ValueError(
                f"metric {name!r} could not be loaded ({error}) and has no offline "
                f"built-in; built-ins: {sorted(BUILTIN)}"
            ) from None
        return BUILTIN[name]()


def classification_metrics(*names: str) -> Callable:
    """A ``compute_metrics`` for Trainer: argmax of the logits against the labels."""
    metrics = [load_metric(name) for name in names or ("accuracy",)]

    def compute(prediction) -> dict[str, float]:
        logits = (
            prediction.predictions[0]
            if isinstance(prediction.predictions, tuple)
            else prediction.predictions
        )
        predicted = np.argmax(logits, axis=-1)
        scores: dict[str, float] = {}
        for metric in metrics:
            scores.update(metric.compute(predictions=predicted, references=prediction.label_ids))
        return scores

    return compute
