"""Where TG-IS looks: the share of slice attention that lands on the slices holding the lesion.

For a question about a lesion, a model that reads the image should weight the slices that show
it above their share of the volume (a uniform weighting gives exactly that share). Inputs are
per-sample rows with ``slice_scores`` (one weight per slice, summing to 1) and a boolean mask of
the lesion's slices per row.

Uniform weights are not the only thing to beat: a model that always favours the middle of the
volume, where most organs (and so most lesions) lie, also beats the uniform share without reading
the image. ``positional_share`` is the attention those same slices get from the model's mean
weighting over all the rows (its question- and volume-agnostic habit), so
``attention_on_lesion > positional_share`` says the weights move to where this volume's lesion is.
``sign_test_p`` is the one-sided sign test's p-value for "more questions put more weight on their
lesion than the habit does than the reverse" (ties dropped).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LESION_QUESTION_TYPES = ("organ", "abnormality", "location")


def lesion_attention(scores: Sequence[Sequence[float]], masks: Sequence[np.ndarray],
                     question_types: Sequence[str] | None = None) -> dict:
    """Mean attention share on lesion slices vs the mean share those slices have of the volume."""
    if len(scores) != len(masks):
        raise ValueError(f"{len(scores)} score rows but {len(masks)} lesion masks")
    if not len(scores):
        raise ValueError("no lesion questions with slice scores to measure")
    rows, lesion = [], []
    for s, m in zip(scores, masks):
        s, m = np.asarray(s, dtype=np.float64), np.asarray(m, dtype=bool)
        if s.shape != m.shape:
            raise ValueError(f"slice scores of shape {s.shape} do not match a lesion mask of shape {m.shape}")
        if rows and s.shape != rows[0].shape:
            raise ValueError(f"slice scores of shape {s.shape} differ from the first row's {rows[0].shape}")
        rows.append(s / s.sum())
        lesion.append(m)
    weights, lesion = np.stack(rows), np.stack(lesion)
    att = (weights * lesion).sum(1)
    share = lesion.mean(1)
    positional = (weights.mean(0) * lesion).sum(1)
    out = {"n": len(att), "attention_on_lesion": float(att.mean()), "lesion_slice_share": float(share.mean()),
           "positional_share": float(positional.mean()),
           "questions_above_share": float(np.mean(att > share)),
           "questions_above_positional": float(np.mean(att > positional)),
           "sign_test_p": sign_test_p(int(np.sum(att > positional)), int(np.sum(att < positional)))}
    out["ratio"] = out["attention_on_lesion"] / out["lesion_slice_share"]
    out["ratio_to_positional"] = out["attention_on_lesion"] / out["positional_share"]
    if question_types is not None:
        out["per_type"] = {t: float(np.mean([a for a, q in zip(att, question_types) if q == t]))
                           for t in dict.fromkeys(question_types)}
    return out


def sign_test_p(wins: int, losses: int) -> float:
    """P(at least ``wins`` of ``wins + losses`` fair coin flips come up heads): the exact one-sided sign test."""
    n = wins + losses
    if n == 0:
        return 1.0
    return float(sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n)


def plot_slice_attention(scores: Sequence[Sequence[float]], masks: Sequence[np.ndarray], labels: Sequence[str],
                         title: str, path: str) -> str:
    """Heatmap, one row per question: slice weights, with the lesion's slices outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    s = np.asarray(scores, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.22 * len(s)))
    im = ax.imshow(s, aspect="auto", cmap="magma", interpolation="nearest")
    for row, m in enumerate(masks):
        for k in np.nonzero(np.asarray(m))[0]:
            ax.add_patch(Rectangle((k - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="cyan", lw=0.8))
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_xlabel("slice (cyan outline: slices holding the lesion)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="TG-IS slice weight")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
