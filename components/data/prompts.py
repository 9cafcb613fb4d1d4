"""Sample record -> (question, answer) text for training and evaluation, as the peers format them."""
from __future__ import annotations

import random

# Instructions for report generation; training samples one per example, evaluation uses the first.
CAPTION_PROMPTS = (
    "Write the findings for this CT scan.",
    "Describe the findings in this CT volume.",
    "What are the findings of this scan?",
    "Report the findings you see in this CT.",
    "Give a findings report for this CT study.",
    "Summarise the imaging findings of this volume.",
)
EVAL_CAPTION_PROMPT = CAPTION_PROMPTS[0]


def closed_question(question: str, choices: list[str]) -> str:
    """M3D's closed-ended layout: the question, then ``Choices: A. .. B. .. C. .. D. ..``."""
    return f"{question} Choices: " + " ".join(f"{letter}. {c}" for letter, c in zip("ABCD", choices))


def format_sample(sample: dict, rng: random.Random | None = None) -> tuple[str, str]:
    """``(question, answer)`` for a sample record; ``rng`` picks the caption instruction (None = fixed)."""
    task = sample["task"]
    if task == "caption":
        prompt = rng.choice(CAPTION_PROMPTS) if rng is not None else EVAL_CAPTION_PROMPT
        return prompt, sample["answer"]
    if task == "vqa_closed":
        choices = list(sample["choices"])
        return closed_question(sample["question"], choices), f"{sample['answer_choice']}. {sample['answer']}"
    return sample["question"], str(sample["answer"])
