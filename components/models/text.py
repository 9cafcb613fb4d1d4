"""Prompt formatting, training examples and batch collation for VolumeVLM.

One ``image_token`` goes into the user turn; after tokenisation it is expanded to the model's M
image positions, which VolumeVLM fills with image embeddings. Labels are -100 on the prompt
(image positions included) and on padding, so only the answer is learned.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["IGNORE_INDEX", "format_prompt", "build_example", "collate"]

IGNORE_INDEX = -100
# Used when a tokenizer has no chat template of its own.
PLAIN_PROMPT = "USER: {content}\nASSISTANT: "


def _messages(question: str, image_token: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": f"{image_token}\n{question}"})
    return messages


def format_prompt(tokenizer, question: str, image_token: str = "<image>", system_prompt: str | None = None) -> str:
    """The prompt text up to where the answer starts (chat template with generation prompt, if any)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(_messages(question, image_token, system_prompt),
                                             add_generation_prompt=True, tokenize=False)
    prefix = f"{system_prompt}\n" if system_prompt else ""
    return prefix + PLAIN_PROMPT.format(content=f"{image_token}\n{question}")


def _answer_text(tokenizer, question: str, answer: str, image_token: str, system_prompt: str | None,
                 prompt: str) -> str:
    """The answer as the template closes an assistant turn (e.g. ``answer<|im_end|>\\n``)."""
    if getattr(tokenizer, "chat_template", None):
        messages = _messages(question, image_token, system_prompt) + [{"role": "assistant", "content": answer}]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt):
            return full[len(prompt):]
    return answer + (tokenizer.eos_token or "")


def build_example(tokenizer, question: str, answer: str | None = None, *, image_token_id: int,
                  num_image_tokens: int, image_token: str = "<image>", system_prompt: str | None = None,
                  max_length: int | None = None) -> dict[str, list[int]]:
    """Token ids for one (question, answer) pair.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (-100 except on the answer) and
    ``question_ids`` (the bare question, whose embeddings guide TG-IS). Without ``answer`` the
    sequence stops at the generation prompt (for ``generate``). ``max_length`` cuts the answer's
    end; the prompt and image positions are never cut.
    """
    prompt = format_prompt(tokenizer, question, image_token, system_prompt)
    templated = bool(getattr(tokenizer, "chat_template", None))
    # chat templates write their own BOS; plain prompts take the tokenizer's
    prompt_ids = tokenizer(prompt, add_special_tokens=not templated)["input_ids"]
    at = [i for i, t in enumerate(prompt_ids) if t == image_token_id]
    if len(at) != 1:
        raise ValueError(f"the prompt must hold exactly one {image_token!r} token, found {len(at)}")
    prompt_ids = prompt_ids[:at[0]] + [image_token_id] * num_image_tokens + prompt_ids[at[0] + 1:]
    answer_ids: list[int] = []
    if answer is not None:
        answer_ids = tokenizer(_answer_text(tokenizer, question, answer, image_token, system_prompt, prompt),
                               add_special_tokens=False)["input_ids"]
        if max_length is not None:
            answer_ids = answer_ids[:max(0, max_length - len(prompt_ids))]
    input_ids = prompt_ids + answer_ids
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        "question_ids": tokenizer(question, add_special_tokens=False)["input_ids"] or [image_token_id],
    }


def _pad(rows: Sequence[Sequence[int]], value: int, side: str) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            if side == "right":
                out[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
            else:
                out[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
    return out


def collate(examples: Sequence[dict[str, Any]], pad_token_id: int, padding_side: str = "right") -> dict[str, Any]:
    """Pad a list of ``build_example`` outputs (plus any extra fields) into a batch.

    ``padding_side="left"`` for generation. ``question_ids`` get their own
    ``question_attention_mask``. Tensor fields (e.g. ``volume``) are stacked; other fields are listed.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    batch: dict[str, Any] = {}
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX, "question_ids": pad_token_id}
    for key in examples[0]:
        values = [ex[key] for ex in examples]
        if key in pads:
            batch[key] = _pad(values, pads[key], padding_side)
            if key == "question_ids":
                batch["question_attention_mask"] = _pad([[1] * len(v) for v in values], 0, padding_side)
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch
