"""The text metrics as ``evaluate`` modules that load from local files (the Hub is not needed).

``load("bleu1")`` is ``evaluate.load(<this directory>/bleu1/bleu1.py)``; likewise
``rouge1``, ``meteor`` and ``bertscore``. Each module's ``compute(predictions=...,
references=...)`` returns the mean, the per-sample values and the settings used.
References may be strings or one-element lists, as the papers' scripts pass them.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["MODULE_NAMES", "module_path", "load"]

MODULE_NAMES = ("bleu1", "rouge1", "meteor", "bertscore")


def module_path(name: str) -> Path:
    """The script of module ``name``."""
    if name not in MODULE_NAMES:
        raise ValueError(f"unknown metric module {name!r}; choose from {MODULE_NAMES}")
    return Path(__file__).resolve().parent / name / f"{name}.py"


def load(name: str, **kwargs):
    """``evaluate.load`` of the local module ``name`` (kwargs go to ``evaluate.load``)."""
    import evaluate

    return evaluate.load(str(module_path(name)), **kwargs)
