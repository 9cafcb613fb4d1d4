"""Med-2E3's Text-Guided Inter-Slice (TG-IS) fusion of 3D and per-slice 2D features.

Inputs, all already at the LLM width D:
  z3D    (B, L2, D)      3D features from the 3D perceiver, on a (d, h, w) grid
  z2D^j  (B, N, L', D)   2D features of each of the N slices (2D encoder + slice projector)
  z_T    (B, T, D)       the question's token embeddings from the LLM's input embedding layer

Steps (paper Sec. 3.2-3.3 and supplement Algorithm 1):
  z3D^j = Algorithm1(z3D)                          (B, N, h*w, D)
  z^j   = AvgPool([z3D^j ; z2D^j])                 (B, N, D)      mean over the slice's tokens
  s     = Softmax_j(AvgPool(z_T) . z^j / tau)      (B, N)
  z2D   = sum_j s_j z2D^j                          (B, L', D)
  z_I   = [z3D ; z2D]                              (B, L2 + L', D)

Ablations (paper Tables 3-5): ``aggregation`` in {tgis, avg, max, random}; ``scoring_inputs`` any
subset of {text, 3d, 2d} holding at least one image input (without text a linear layer scores
z^j, as the paper describes); ``output`` "3d+2d" (Med-2E3) or "2d" (the 2D-only row).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .base import Grid
from .mlp import mlp

AGGREGATIONS = ("tgis", "avg", "max", "random")
SCORING_INPUTS = ("text", "3d", "2d")
OUTPUTS = ("3d+2d", "2d")


def slices_from_3d(z3d: torch.Tensor, grid: Grid, num_slices: int) -> torch.Tensor:
    """Algorithm 1: give each of the N slices the 3D features of the depth layer it lies in.

    ``(B, d*h*w, D)`` -> reshape to ``(B, d, h, w, D)`` -> replicate every depth layer
    r = N / d (= N1 * P) times, interleaved (layer i fills slices i*r .. i*r + r - 1, rather than
    the whole stack being tiled r times) -> reshape to ``(B, N, h*w, D)``.
    """
    b, n, dim = z3d.shape
    d, h, w = grid
    if n != d * h * w:
        raise ValueError(f"TG-IS: {n} 3D tokens do not fill the grid {tuple(grid)}")
    if num_slices % d:
        raise ValueError(f"TG-IS: {num_slices} slices are not a multiple of the 3D grid depth {d}")
    x = z3d.reshape(b, d, h, w, dim)
    x = x.repeat_interleave(num_slices // d, dim=1)
    return x.reshape(b, num_slices, h * w, dim)


@dataclass
class FusionOutput:
    tokens: torch.Tensor                 # (B, M, D) image tokens for the LLM
    scores: torch.Tensor | None = None   # (B, N) slice weights (sum to 1); None for max aggregation


class TGISFusion(nn.Module):
    """Scores slices against the question and appends the score-weighted 2D features to z3D.

    ``in_dim_2d`` is the 2D encoder width; a slice projector (``projector_depth`` linear layers,
    2 = Med-2E3's ``mlp2x_gelu``) brings every slice token to the LLM width ``dim``.
    """

    def __init__(self, dim: int, in_dim_2d: int, aggregation: str = "tgis",
                 scoring_inputs: Sequence[str] = SCORING_INPUTS, tau: float = 1.0,
                 output: str = "3d+2d", projector_depth: int = 2, score_dropout: float = 0.0):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"TG-IS aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        inputs = tuple(dict.fromkeys(scoring_inputs))
        bad = [i for i in inputs if i not in SCORING_INPUTS]
        if bad or not inputs:
            raise ValueError(f"TG-IS scoring_inputs must be a non-empty subset of {SCORING_INPUTS}, got {list(scoring_inputs)}")
        if aggregation == "tgis" and not ({"3d", "2d"} & set(inputs)):
            # z^j would be empty: every slice would get the same score.
            raise ValueError("TG-IS scoring_inputs needs '3d' and/or '2d' to describe each slice")
        if output not in OUTPUTS:
            raise ValueError(f"TG-IS output must be one of {OUTPUTS}, got {output!r}")
        if tau <= 0:
            raise ValueError(f"TG-IS tau must be positive, got {tau}")
        self.dim, self.aggregation, self.scoring_inputs = dim, aggregation, inputs
        self.tau, self.output = float(tau), output
        self.projector_2d = mlp(in_dim_2d, dim, projector_depth)
        self.needs_text = aggregation == "tgis" and "text" in inputs
        # without the question, a linear layer maps each slice feature to a score
        self.scorer = nn.Linear(dim, 1) if aggregation == "tgis" and not self.needs_text else None
        self.score_dropout = nn.Dropout(score_dropout)

    def out_tokens(self, tokens_3d: int, tokens_per_slice: int) -> int:
        return tokens_per_slice + (tokens_3d if self.output == "3d+2d" else 0)

    def slice_scores(self, z3d_j: torch.Tensor, z2d_j: torch.Tensor,
                     text_embeds: torch.Tensor | None, text_mask: torch.Tensor | None) -> torch.Tensor:
        parts = []
        if "3d" in self.scoring_inputs:
            parts.append(z3d_j)
        if "2d" in self.scoring_inputs:
            parts.append(z2d_j)
        z_j = torch.cat(parts, dim=2).mean(dim=2)  # (B, N, D)
        if self.needs_text:
            if text_embeds is None:
                raise ValueError("TG-IS with text scoring needs the question embeddings (text_embeds)")
            if text_mask is None:
                z_t = text_embeds.mean(dim=1)
            else:
                m = text_mask.to(text_embeds.dtype).unsqueeze(-1)
                z_t = (text_embeds * m).sum(1) / m.sum(1).clamp(min=1.0)
            logits = torch.einsum("bnd,bd->bn", z_j, z_t.to(z_j.dtype))
        else:
            logits = self.scorer(z_j).squeeze(-1)
        return torch.softmax(logits / self.tau, dim=1)

    def forward(self, z3d: torch.Tensor, grid_3d: Grid, feats_2d: torch.Tensor,
                text_embeds: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> FusionOutput:
        """``z3d`` (B, L2, D) on ``grid_3d``; ``feats_2d`` (B, N, L', C2d) raw 2D encoder features."""
        z2d_j = self.projector_2d(feats_2d)  # (B, N, L', D)
        b, n = z2d_j.shape[:2]
        if self.aggregation == "tgis":
            z3d_j = slices_from_3d(z3d, grid_3d, n) if "3d" in self.scoring_inputs else None
            scores = self.slice_scores(z3d_j, z2d_j, text_embeds, text_mask)
        elif self.aggregation == "avg":
            scores = z2d_j.new_full((b, n), 1.0 / n)
        elif self.aggregation == "random":
            scores = torch.softmax(torch.randn(b, n, device=z2d_j.device, dtype=z2d_j.dtype), dim=1)
        else:
            scores = None
        if scores is None:
            z2d = z2d_j.amax(dim=1)
        else:
            z2d = torch.einsum("bn,bnld->bld", self.score_dropout(scores), z2d_j)
        tokens = torch.cat([z3d, z2d], dim=1) if self.output == "3d+2d" else z2d
        return FusionOutput(tokens=tokens, scores=scores)
