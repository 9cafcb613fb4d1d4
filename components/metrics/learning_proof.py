"""The quickstart's proof that the image informs the answers, from two evaluations of one recipe.

1. Held-out closed-ended VQA accuracy of the trained model is at least twice chance, while the
   blind twin (same recipe, images replaced) stays within ``blind_margin`` of chance.
2. Report generation: the trained model's METEOR is above the blind twin's.
3. TG-IS: on questions about a lesion, the share of slice attention on the slices holding the
   lesion exceeds those slices' share of the volume, and exceeds what the model's usual weighting
   gives those slices (so a habit of looking at the middle, where most lesions lie, does not count).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from components.metrics.slice_attention import LESION_QUESTION_TYPES, lesion_attention


def task_micro(result: Mapping, task: str, metric: str) -> float:
    for t in result["tasks"]:
        if t["task"] == task:
            return float(t["micro"][metric])
    raise KeyError(f"results of {result.get('run')!r} have no {task!r} task")


def lesion_rows(rows: Sequence[Mapping], masks_by_volume: Mapping[str, np.ndarray | None],
                tasks: Sequence[str] = ("vqa_closed", "vqa_open")) -> tuple[list, list, list]:
    """``(scores, masks, question types)`` of the rows that ask about a present lesion."""
    scores, masks, types = [], [], []
    for r in rows:
        mask = masks_by_volume.get(r["volume_id"])
        if (r.get("task") in tasks and r.get("question_type") in LESION_QUESTION_TYPES and mask is not None
                and r.get("slice_scores")):
            scores.append(r["slice_scores"])
            masks.append(mask)
            types.append(r["question_type"])
    return scores, masks, types


def looks_at_lesions(attention: Mapping | None, ratio: float = 1.1, alpha: float = 0.01) -> bool:
    """Attention on the lesion's slices is at least ``ratio`` times their share (an untrained TG-IS
    spreads its weights almost evenly and would otherwise pass by a hair), above the model's own
    positional habit, and significantly so over the questions (sign test at ``alpha``)."""
    if not attention:
        return False
    return (attention["attention_on_lesion"] >= ratio * attention["lesion_slice_share"]
            and attention["attention_on_lesion"] > attention["positional_share"]
            and attention["sign_test_p"] < alpha)


def learning_proof(trained: Mapping, blind: Mapping, attention: Mapping | None, chance: float = 0.25,
                   blind_margin: float = 0.05, attention_ratio: float = 1.1) -> dict:
    """The three conditions with their figures; ``attention`` is :func:`lesion_attention`'s output
    (None for a model without TG-IS, which leaves that condition unmet); see :func:`looks_at_lesions`."""
    acc, blind_acc = task_micro(trained, "vqa_closed", "accuracy"), task_micro(blind, "vqa_closed", "accuracy")
    meteor, blind_meteor = task_micro(trained, "caption", "meteor"), task_micro(blind, "caption", "meteor")
    conditions = [
        {"name": "closed-VQA accuracy >= 2x chance, blind model within "
                 f"{100 * blind_margin:.0f} points of chance",
         "passed": acc >= 2 * chance and abs(blind_acc - chance) <= blind_margin,
         "figures": {"trained": acc, "blind": blind_acc, "chance": chance}},
        {"name": "report METEOR above the blind model's", "passed": meteor > blind_meteor,
         "figures": {"trained": meteor, "blind": blind_meteor}},
        {"name": f"TG-IS attention on lesion slices >= {attention_ratio:g}x their share of the volume and "
                 "above the model's positional habit (sign test p < 0.01)",
         "passed": looks_at_lesions(attention, attention_ratio),
         "figures": dict(attention or {})},
    ]
    return {"passed": all(c["passed"] for c in conditions), "conditions": conditions}


__all__ = ["learning_proof", "lesion_rows", "lesion_attention", "looks_at_lesions", "task_micro"]
