"""Builders and validation for the evaluation results JSON (schema: :mod:`components.metrics.tables`).

One result dict per model/run: the run label, the model, the generation settings and a
list of task results, each carrying its own metric settings. The builders turn per-sample
outputs into task results; :func:`validate_result` checks a loaded dict.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from .aggregate import aggregate_by_type
from .diagnosis import diagnosis_metrics
from .retrieval import TEST_SIZES, TOP_K, retrieval_recalls
from .text import TextMetricResult
from .vqa import closed_vqa_scores, yes_no_scores

__all__ = [
    "SCHEMA_VERSION",
    "TASKS",
    "GenerationSettings",
    "text_task",
    "closed_vqa_task",
    "yes_no_task",
    "diagnosis_task",
    "retrieval_task",
    "run_result",
    "validate_result",
    "save_result",
    "load_results",
]

SCHEMA_VERSION = 1
TASKS = ("caption", "vqa_open", "vqa_closed", "vqa_yn", "diagnosis", "retrieval")
TEXT_TASKS = ("caption", "vqa_open")

CLOSED_VQA_SETTINGS = {
    "accuracy": "papers' rule: answer_choice + '.' occurs in the generated text (case-sensitive)",
    "parsed_accuracy": "components.metrics.vqa.parse_choice equals answer_choice",
}
YES_NO_SETTINGS = {"accuracy": "first 'yes'/'no' word of the prediction equals the answer's; none = wrong"}
DIAGNOSIS_SETTINGS = {
    "positive": "first 'yes'/'no' word is 'yes'; neither counts as negative",
    "balanced_accuracy": "mean recall over classes present in the ground truth",
    "zero_division": 0.0,
    "macro": "mean over labels",
    "micro": "pooled confusion matrix",
}


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings, recorded with every result. Greedy by default."""

    do_sample: bool = False
    """Sample instead of greedy/beam decoding; a real boolean."""
    num_beams: int = 1
    """Beams for beam search; 1 = greedy when not sampling."""
    max_new_tokens: int = 256
    """Generated tokens per answer at most."""
    temperature: float = 1.0
    """Softmax temperature; used only when sampling."""
    top_p: float | None = None
    """Nucleus sampling mass; used only when sampling (None = off)."""
    top_k: int | None = None
    """Sample among the k likeliest tokens; used only when sampling (None = off)."""
    repetition_penalty: float = 1.0
    """Penalty on tokens already generated (1.0 = none)."""
    seed: int = 42
    """Torch seed set before sampling."""

    def __post_init__(self) -> None:
        # argparse's type=bool turns the string "False" into True; refuse anything but a bool.
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {self.do_sample!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _task(task: str, dataset: str, split: str, **fields: Any) -> dict:
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {TASKS}")
    return {"task": task, "dataset": dataset, "split": split, **fields}


def text_task(task: str, dataset: str, text_result: TextMetricResult,
              question_types: Sequence[object] | None = None, split: str = "test") -> dict:
    """A caption / open-ended VQA result from :meth:`TextMetricSuite.compute` output."""
    if task not in TEXT_TASKS:
        raise ValueError(f"text metrics belong to {TEXT_TASKS}, not {task!r}")
    breakdown = aggregate_by_type(text_result.per_sample, question_types)
    return _task(task, dataset, split, metrics=list(text_result.per_sample), settings=text_result.settings,
                 **breakdown.to_dict())


def closed_vqa_task(dataset: str, predictions: Sequence[str], answer_choices: Sequence[str],
                    choices: Sequence[Sequence[str] | None] | None = None,
                    question_types: Sequence[object] | None = None, split: str = "test") -> dict:
    """A closed-ended VQA result: the papers' rule accuracy and parsed-choice accuracy."""
    scores = closed_vqa_scores(predictions, answer_choices, choices)
    breakdown = aggregate_by_type(scores, question_types)
    return _task("vqa_closed", dataset, split, metrics=list(scores), settings=CLOSED_VQA_SETTINGS,
                 **breakdown.to_dict())


def yes_no_task(dataset: str, predictions: Sequence[str], answers: Sequence[str | bool],
                question_types: Sequence[object] | None = None, split: str = "test") -> dict:
    """A yes/no VQA result."""
    scores = yes_no_scores(predictions, answers)
    breakdown = aggregate_by_type(scores, question_types)
    return _task("vqa_yn", dataset, split, metrics=list(scores), settings=YES_NO_SETTINGS, **breakdown.to_dict())


def diagnosis_task(dataset: str, labels: Sequence[str], truths: Sequence[bool | int],
                   predictions: Sequence[str], split: str = "test") -> dict:
    """A disease-diagnosis result (one entry per volume and label asked)."""
    metrics = diagnosis_metrics(labels, truths, predictions)
    return _task("diagnosis", dataset, split, metrics=["balanced_accuracy", "precision", "recall", "f1"],
                 settings=DIAGNOSIS_SETTINGS, **metrics)


def retrieval_task(dataset: str, similarity, sizes: Sequence[int] = TEST_SIZES, ks: Sequence[int] = TOP_K,
                   split: str = "test", settings: Mapping[str, Any] | None = None) -> dict:
    """An image-text retrieval result from the image-by-text similarity matrix; ``settings`` adds what
    produced the matrix (checkpoint, text field, normalisation, ...)."""
    recalls = retrieval_recalls(similarity, sizes, ks)
    n = len(similarity)
    settings = {"sizes": list(sizes), "ks": list(ks), "pairs": "first N test pairs",
                "ties": "resolved in the match's favour", **(settings or {})}
    return _task("retrieval", dataset, split, metrics=[f"R@{k}" for k in ks], settings=settings,
                 n_samples=n, **recalls)


def run_result(run: str, tasks: Sequence[Mapping], generation: GenerationSettings | None = None,
               model: Mapping[str, Any] | None = None, notes: str = "") -> dict:
    """The result dict for one model/run, validated."""
    result = {
        "schema_version": SCHEMA_VERSION,
        "run": run,
        "model": dict(model or {}),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "generation": (generation or GenerationSettings()).to_dict(),
        "tasks": [dict(t) for t in tasks],
        "notes": notes,
    }
    validate_result(result)
    return result


def _fail(path: str, message: str) -> None:
    raise ValueError(f"results{path}: {message}")


def _check_number_map(values: Any, path: str) -> None:
    if not isinstance(values, Mapping):
        _fail(path, f"expected an object, got {type(values).__name__}")
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(f"{path}.{key}", f"expected a finite number, got {value!r}")


def validate_result(result: Mapping) -> None:
    """Raise ``ValueError`` naming the offending field when ``result`` breaks the schema."""
    if not isinstance(result, Mapping):
        _fail("", "expected an object")
    for key in ("schema_version", "run", "generation", "tasks"):
        if key not in result:
            _fail(f".{key}", "missing")
    if result["schema_version"] != SCHEMA_VERSION:
        _fail(".schema_version", f"expected {SCHEMA_VERSION}, got {result['schema_version']!r}")
    if not isinstance(result["run"], str) or not result["run"]:
        _fail(".run", "expected a non-empty string")
    if not isinstance(result["generation"].get("do_sample"), bool):
        _fail(".generation.do_sample", f"expected a boolean, got {result['generation'].get('do_sample')!r}")
    for i, task in enumerate(result["tasks"]):
        path = f".tasks[{i}]"
        if task.get("task") not in TASKS:
            _fail(f"{path}.task", f"expected one of {TASKS}, got {task.get('task')!r}")
        for key in ("dataset", "split", "settings", "metrics"):
            if key not in task:
                _fail(f"{path}.{key}", "missing")
        if task["task"] == "retrieval":
            for direction in ("image_to_text", "text_to_image"):
                for size, recalls in task.get(direction, {}).items():
                    _check_number_map(recalls, f"{path}.{direction}.{size}")
            continue
        for key in ("micro", "macro"):
            _check_number_map(task.get(key), f"{path}.{key}")
        groups = task.get("per_label" if task["task"] == "diagnosis" else "per_type", {})
        for name, values in groups.items():
            _check_number_map(values, f"{path}.{'per_label' if task['task'] == 'diagnosis' else 'per_type'}.{name}")


def save_result(result: Mapping, path: str | Path) -> Path:
    """Validate and write one result as indented JSON."""
    validate_result(result)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def load_results(paths: Sequence[str | Path]) -> list[dict]:
    """Read and validate result files, in the given order."""
    results = []
    for path in paths:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
        validate_result(result)
        results.append(result)
    return results
