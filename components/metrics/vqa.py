"""Closed-ended and yes/no VQA scoring.

The papers' closed-ended rule (M3D ``eval_vqa.py``, reused by Med-2E3 and Med3DVLM): a
generated text is correct when it contains the answer letter followed by a period
(``answer_choice + "." in generated_text``), case-sensitive, anywhere in the text. It
rewards "Answer: B. Liver" and also any text that merely mentions "B." while choosing
another option. :func:`parse_choice` is the stricter reading reported beside it: the one
option the text commits to, or ``None`` when it names none or several.
"""
from __future__ import annotations

import re
from typing import Sequence

__all__ = [
    "closed_correct_paper_rule",
    "parse_choice",
    "closed_correct_parsed",
    "closed_vqa_scores",
    "parse_yes_no",
    "yes_no_scores",
]

DEFAULT_LETTERS = "ABCD"


def closed_correct_paper_rule(prediction: str, answer_choice: str) -> bool:
    """The papers' rule: ``answer_choice + "."`` occurs in the prediction."""
    return f"{answer_choice}." in prediction


def _letters(choices: Sequence[str] | None) -> str:
    return DEFAULT_LETTERS if not choices else "ABCDEFGHIJ"[: len(choices)]


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def parse_choice(prediction: str, choices: Sequence[str] | None = None) -> str | None:
    """The option letter a generated text commits to, or ``None``.

    In order: a letter opening the text ("B", "B.", "(B)", "B) ...", "B: ...", not "B ..."); a letter
    after "answer"/"option"/"choice" ("Answer: B", "The answer is (B)"); the text being one
    option's wording ("Liver" when option B is "Liver"); else the only distinct letter
    written as "X." / "(X)" / "X)" in the text. ``choices`` are the option texts in letter
    order (A, B, ...); without them letters A-D are accepted.
    """
    letters = _letters(choices)
    text = prediction.strip()
    letter_class = f"[{letters}]"
    # A bare leading letter followed by a space is not taken: "A large mass ..." is prose.
    opening = re.match(rf"^\(?({letter_class})(?:[.):\]]|$)", text)
    if opening:
        return opening.group(1)
    keyword = re.search(rf"\b(?i:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*\(?({letter_class})\b", text)
    if keyword:
        return keyword.group(1)
    if choices:
        wording = _normalise(text)
        matches = [letters[i] for i, option in enumerate(choices) if wording and _normalise(option) == wording]
        if len(matches) == 1:
            return matches[0]
    marked = set(re.findall(rf"(?<![A-Za-z])\(?({letter_class})(?:\.|\))", text))
    if len(marked) == 1:
        return marked.pop()
    return None


def closed_correct_parsed(prediction: str, answer_choice: str, choices: Sequence[str] | None = None) -> bool:
    """Correct when :func:`parse_choice` finds exactly the answer letter."""
    return parse_choice(prediction, choices) == answer_choice


def closed_vqa_scores(predictions: Sequence[str], answer_choices: Sequence[str],
                      choices: Sequence[Sequence[str] | None] | None = None) -> dict[str, list[float]]:
    """Per-sample 1.0/0.0 under both rules: ``accuracy`` (papers' rule) and ``parsed_accuracy``."""
    if len(predictions) != len(answer_choices):
        raise ValueError(f"{len(predictions)} predictions but {len(answer_choices)} answers")
    options = list(choices) if choices is not None else [None] * len(predictions)
    return {
        "accuracy": [float(closed_correct_paper_rule(p, a)) for p, a in zip(predictions, answer_choices)],
        "parsed_accuracy": [float(closed_correct_parsed(p, a, c)) for p, a, c in zip(predictions, answer_choices, options)],
    }


_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_yes_no(text: str) -> bool | None:
    """True for a text whose first yes/no word is "yes", False for "no", else None."""
    match = _YES_NO.search(text)
    if match is None:
        return None
    return match.group(1).lower() == "yes"


def yes_no_scores(predictions: Sequence[str], answers: Sequence[str | bool]) -> dict[str, list[float]]:
    """Per-sample 1.0/0.0: the prediction's yes/no equals the answer's (unparsed = wrong)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    scores = []
    for i, (prediction, answer) in enumerate(zip(predictions, answers)):
        truth = answer if isinstance(answer, bool) else parse_yes_no(answer)
        if truth is None:
            raise ValueError(f"answer {i} ({answer!r}) is neither yes nor no")
        scores.append(float(parse_yes_no(prediction) is truth))
    return {"accuracy": scores}
