"""Predictions -> per-sample metric rows and the results dict (:mod:`components.metrics.results`)."""
from __future__ import annotations

import json
from typing import Mapping, Protocol, Sequence

from components.metrics.results import (GenerationSettings, closed_vqa_task, diagnosis_task, run_result,
                                        text_task, yes_no_task)
from components.metrics.text import TextMetricResult, TextMetricSettings, TextMetricSuite
from components.metrics.vqa import closed_vqa_scores, parse_yes_no, yes_no_scores

__all__ = ["ROW_FIELDS", "TextScorer", "diagnosis_label", "score"]

ROW_FIELDS = ("id", "volume_id", "task", "question_type", "question", "answer", "answer_choice", "prediction")
"""Sample fields every per-sample row carries (plus ``image_volume_id``, ``slice_scores``, ``truncated``
when present)."""


class TextScorer(Protocol):
    """What computes the text metrics: a :class:`TextMetricSuite`, or a stand-in that sends the
    pairs elsewhere (the Serve job's scorer deployment) and returns the same result."""

    def compute(self, predictions: Sequence[str], references: Sequence[str]) -> TextMetricResult: ...


def diagnosis_label(sample: Mapping) -> tuple[str, bool]:
    """``(disease, present)`` of a diagnosis sample; its ``labels`` JSON names the one disease asked about."""
    labels = sample["labels"]
    labels = json.loads(labels) if isinstance(labels, str) else dict(labels or {})
    if len(labels) != 1:
        raise ValueError(f"diagnosis sample {sample.get('id')!r}: expected one label, got {labels!r}")
    (name, value), = labels.items()
    return name, bool(value)


def _row(record: Mapping) -> dict:
    row = {k: record.get(k) for k in ROW_FIELDS}
    for extra in ("image_volume_id", "slice_scores", "truncated"):
        if record.get(extra) is not None:
            row[extra] = record[extra]
    return row


def _attach(rows: list[dict], metrics: Mapping[str, Sequence[float]]) -> None:
    for name, values in metrics.items():
        for row, value in zip(rows, values):
            row[name] = float(value)


def score(records: Sequence[Mapping], dataset: str = "phantom", split: str = "test", run: str = "run",
          generation: GenerationSettings | None = None, model: Mapping | None = None,
          text_scorer: TextScorer | None = None, text_settings: TextMetricSettings | None = None,
          notes: str = "") -> tuple[list[dict], dict]:
    """``(per-sample rows, results dict)`` for records = sample fields + ``prediction``.

    Tasks present among the records are scored: caption / vqa_open with the text metrics,
    vqa_closed by the papers' rule and the parsed choice, vqa_yn by yes/no, diagnosis per label.
    ``text_scorer`` defaults to a :class:`TextMetricSuite` with ``text_settings``.
    """
    by_task: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_task.setdefault(record["task"], []).append(i)
    rows = [_row(r) for r in records]
    tasks = []
    for task, idx in by_task.items():
        recs = [records[i] for i in idx]
        task_rows = [rows[i] for i in idx]
        preds = [r["prediction"] for r in recs]
        types = [r.get("question_type") for r in recs]
        if task in ("caption", "vqa_open"):
            scorer = text_scorer or TextMetricSuite(text_settings or TextMetricSettings())
            computed = scorer.compute(preds, [str(r["answer"]) for r in recs])
            result = text_task(task, dataset, computed, types, split=split)
            _attach(task_rows, computed.per_sample)
        elif task == "vqa_closed":
            args = (preds, [r["answer_choice"] for r in recs], [list(r.get("choices") or []) or None for r in recs])
            result = closed_vqa_task(dataset, *args, question_types=types, split=split)
            _attach(task_rows, closed_vqa_scores(*args))
        elif task == "vqa_yn":
            args = (preds, [r["answer"] for r in recs])
            result = yes_no_task(dataset, *args, question_types=types, split=split)
            _attach(task_rows, yes_no_scores(*args))
        elif task == "diagnosis":
            labels, truths = zip(*(diagnosis_label(r) for r in recs))
            result = diagnosis_task(dataset, list(labels), list(truths), preds, split=split)
            _attach(task_rows, {"accuracy": [float((parse_yes_no(p) is True) == t) for p, t in zip(preds, truths)]})
        else:
            raise ValueError(f"task {task!r} cannot be scored from generated text")
        if any("truncated" in r for r in recs):
            # a cut-off prediction scores lower than the model's answer would: the count says how many were
            result["truncated"] = sum(bool(r.get("truncated")) for r in recs)
        tasks.append(result)
    return rows, run_result(run, tasks, generation=generation, model=model, notes=notes)

