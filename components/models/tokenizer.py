"""A tokenizer refitted to one dataset's text, for language models trained from scratch on it.

A general tokenizer's ~50k-token vocabulary makes the output layer the largest cost of a small
LLM trained from random weights: on the CPU quickstart it took ~90 % of each step. Text from one
dataset needs a few hundred tokens. Refitting keeps the base tokenizer's pre-tokeniser, special
tokens and chat template, so prompts are built the same way; byte-level BPE still encodes any text.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

from components.data.prompts import CAPTION_PROMPTS, format_sample
from components.models.text import format_prompt


def sample_texts(samples: Iterable[dict], tokenizer, image_token: str = "<image>",
                 system_prompt: str | None = None) -> Iterator[str]:
    """Each sample as the model reads it: the templated prompt followed by the answer."""
    rng = random.Random(0)
    for prompt in CAPTION_PROMPTS:
        yield format_prompt(tokenizer, prompt, image_token, system_prompt)
    for sample in samples:
        question, answer = format_sample(sample, rng)
        yield format_prompt(tokenizer, question, image_token, system_prompt) + answer


def refit_tokenizer(base, texts: Iterable[str], vocab_size: int):
    """``base`` with BPE merges learned from ``texts`` (at most ``vocab_size`` tokens; a small corpus
    runs out of merges earlier)."""
    if not getattr(base, "is_fast", False):
        raise ValueError(f"refitting needs a fast (Rust) tokenizer, got {type(base).__name__}")
    return base.train_new_from_iterator(texts, vocab_size=vocab_size)
