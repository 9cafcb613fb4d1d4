"""What the local ``evaluate`` text-metric modules share: input features and argument handling."""
from __future__ import annotations

from typing import Sequence

from components.metrics.text import as_single_references

_CITATION = "See the papers listed in the radray documentation (M3D, E3D-GPT, Med-2E3, Med3DVLM)."

_INPUTS = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, one per prediction (a string or a one-element list).
    strip: strip surrounding whitespace first, as the papers' scripts do (default True).
Returns:
    the mean under the metric's name, ``per_sample`` values and the ``settings`` used.
"""


def metric_info(description: str):
    """``evaluate.MetricInfo`` for a text metric taking one reference per prediction."""
    import datasets
    import evaluate

    return evaluate.MetricInfo(
        description=description,
        citation=_CITATION,
        inputs_description=_INPUTS,
        features=[
            datasets.Features({
                "predictions": datasets.Value("string", id="sequence"),
                "references": datasets.Sequence(datasets.Value("string", id="sequence"), id="references"),
            }),
            datasets.Features({
                "predictions": datasets.Value("string", id="sequence"),
                "references": datasets.Value("string", id="sequence"),
            }),
        ],
    )


def prepare(predictions: Sequence[str], references: Sequence, strip: bool) -> tuple[list[str], list[str]]:
    """Predictions and single references, stripped when ``strip``."""
    references = as_single_references(references)
    predictions = list(predictions)
    if strip:
        return [p.strip() for p in predictions], [r.strip() for r in references]
    return predictions, references


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
