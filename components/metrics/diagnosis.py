"""Disease diagnosis from yes/no answers (E3D-GPT Table 4).

For each label (disease) the model is asked "Does this image show signs of <label>?"; a
"yes" is a positive prediction. Per label: balanced accuracy (mean recall over the classes
present in the ground truth, as scikit-learn's ``balanced_accuracy_score``), precision,
recall and F1 of the positive class (0 when undefined, as scikit-learn's
``zero_division=0``). ``macro`` averages the labels (the table's figures); ``micro`` pools
all label decisions into one confusion matrix. An answer with neither yes nor no counts as
a negative prediction and is counted in ``n_unparsed``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .vqa import parse_yes_no

__all__ = ["binary_metrics", "diagnosis_metrics", "METRICS"]

METRICS = ("balanced_accuracy", "precision", "recall", "f1")


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def binary_metrics(y_true: Sequence[bool], y_pred: Sequence[bool]) -> dict[str, float]:
    """Balanced accuracy, precision, recall, F1 and the confusion counts for one label."""
    t = np.asarray(y_true, dtype=bool)
    p = np.asarray(y_pred, dtype=bool)
    if t.shape != p.shape:
        raise ValueError(f"{t.size} truths but {p.size} predictions")
    tp = int(np.sum(t & p))
    fp = int(np.sum(~t & p))
    fn = int(np.sum(t & ~p))
    tn = int(np.sum(~t & ~p))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    class_recalls = []
    if tp + fn:
        class_recalls.append(recall)
    if tn + fp:
        class_recalls.append(_ratio(tn, tn + fp))
    return {
        "balanced_accuracy": float(np.mean(class_recalls)) if class_recalls else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }


def diagnosis_metrics(labels: Sequence[str], truths: Sequence[bool | int], predictions: Sequence[str]) -> dict:
    """Per-label metrics, their macro mean and pooled micro metrics.

    One entry per (volume, label) question: ``labels[i]`` the disease asked about,
    ``truths[i]`` whether the volume has it, ``predictions[i]`` the generated answer.
    """
    if not len(labels) == len(truths) == len(predictions):
        raise ValueError(f"lengths differ: {len(labels)} labels, {len(truths)} truths, {len(predictions)} predictions")
    parsed = [parse_yes_no(text) for text in predictions]
    y_pred = np.array([v is True for v in parsed], dtype=bool)
    y_true = np.array([bool(v) for v in truths], dtype=bool)
    names = np.asarray(labels, dtype=object)
    per_label = {}
    for label in dict.fromkeys(labels):  # first-seen order
        rows = names == label
        per_label[label] = {**binary_metrics(y_true[rows], y_pred[rows]), "n": int(rows.sum())}
    macro = {m: float(np.mean([v[m] for v in per_label.values()])) if per_label else 0.0 for m in METRICS}
    pooled = binary_metrics(y_true, y_pred)
    return {
        "per_label": per_label,
        "macro": macro,
        "micro": {m: pooled[m] for m in METRICS},
        "n_samples": len(labels),
        "n_unparsed": sum(v is None for v in parsed),
    }
