"""Per-question-type breakdown with macro and micro averages (Med-2E3 Table 2, Med3DVLM Tables 3-4).

M3D-VQA has five question types (M3D numbers them 1-5: plane, phase, organ, abnormality,
location). ``micro`` averages over all samples; ``macro`` averages the per-type means, so
every type counts equally whatever its size. Samples without a type form the group
``"none"``; when that is the only group, macro equals micro.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = ["QUESTION_TYPES", "normalize_question_type", "TypeBreakdown", "aggregate_by_type", "mean"]

QUESTION_TYPES = ("plane", "phase", "organ", "abnormality", "location")
NO_TYPE = "none"


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; 0.0 for no values."""
    return float(sum(values) / len(values)) if len(values) else 0.0


def normalize_question_type(value: object) -> str:
    """``"plane"``.. ``"location"`` from a name (any case) or M3D's number 1-5; ``"none"`` if absent."""
    if value is None:
        return NO_TYPE
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        index = int(value)
        if index != value or not 1 <= index <= len(QUESTION_TYPES):
            raise ValueError(f"question type number {value!r} is not 1-{len(QUESTION_TYPES)}")
        return QUESTION_TYPES[index - 1]
    text = str(value).strip().lower()
    if text.isdigit():
        return normalize_question_type(int(text))
    return text or NO_TYPE


def _type_order(types: set[str]) -> list[str]:
    known = [t for t in QUESTION_TYPES if t in types]
    return known + sorted(types - set(QUESTION_TYPES) - {NO_TYPE}) + ([NO_TYPE] if NO_TYPE in types else [])


@dataclass
class TypeBreakdown:
    """Means per question type (with sample count ``n``), their macro mean and the micro mean."""

    per_type: dict[str, dict[str, float]]
    macro: dict[str, float]
    micro: dict[str, float]
    n_samples: int

    def to_dict(self) -> dict:
        return {"per_type": self.per_type, "macro": self.macro, "micro": self.micro, "n_samples": self.n_samples}


def aggregate_by_type(per_sample: Mapping[str, Sequence[float]], question_types: Sequence[object] | None = None) -> TypeBreakdown:
    """Group per-sample metric values by question type.

    ``per_sample`` maps metric name -> one value per sample; ``question_types`` gives each
    sample's type (names or M3D numbers; ``None`` = untyped).
    """
    lengths = {name: len(values) for name, values in per_sample.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"per-sample lists differ in length: {lengths}")
    n = next(iter(lengths.values()), 0)
    types = [normalize_question_type(t) for t in question_types] if question_types is not None else [NO_TYPE] * n
    if len(types) != n:
        raise ValueError(f"{len(types)} question types for {n} samples")
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(types):
        groups.setdefault(t, []).append(i)
    per_type = {}
    for t in _type_order(set(groups)):
        rows = groups[t]
        per_type[t] = {"n": len(rows), **{name: mean([values[i] for i in rows]) for name, values in per_sample.items()}}
    micro = {name: mean(values) for name, values in per_sample.items()}
    macro = {name: mean([per_type[t][name] for t in per_type]) for name in per_sample} if per_type else dict(micro)
    return TypeBreakdown(per_type=per_type, macro=macro, micro=micro, n_samples=n)
