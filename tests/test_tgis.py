"""Med-2E3's TG-IS fusion: Algorithm 1, the scoring equations, the ablation switches."""
import itertools

import pytest
import torch

from components.config import ConfigError
from components.models.builders import build_fusion
from components.models.config import FusionSpec
from components.models.perceivers import TGISFusion, slices_from_3d

torch.manual_seed(0)

# Med-2E3 geometry: 32 x 256 x 256 volume, 3D patch 4 x 16 x 16 (N1 = 4), pooling P = 2
# -> z3D on a 4 x 8 x 8 grid (L2 = 256); 32 slices with 256 SigLIP tokens each. Widths reduced.
N, GRID3D, L2D, D, C2D = 32, (4, 8, 8), 256, 16, 24


def inputs(batch=2, text_len=7):
    z3d = torch.randn(batch, 256, D)
    feats = torch.randn(batch, N, L2D, C2D)
    text = torch.randn(batch, text_len, D)
    return z3d, feats, text


def test_algorithm1_replicates_each_depth_layer_interleaved():
    # z3D holds its own token index: depth layer i carries values 4i .. 4i + 3 on a 4 x 2 x 2 grid.
    z3d = torch.arange(16.0).reshape(1, 16, 1)
    slices = slices_from_3d(z3d, (4, 2, 2), num_slices=32)
    assert slices.shape == (1, 32, 4, 1)  # (N, L, D) with L = h * w
    got = slices[0, :, :, 0].long().tolist()
    # N1 * P = 32 / 4 = 8 copies of each layer, consecutive: slices 0-7 <- layer 0, 8-15 <- layer 1, ...
    expected = [[4 * (j // 8) + t for t in range(4)] for j in range(32)]
    assert got == expected
    assert got[:9] == [[0, 1, 2, 3]] * 8 + [[4, 5, 6, 7]]
    # not a tiling of the whole stack (which would give slice 1 <- layer 1)
    tiled = torch.cat([z3d.reshape(1, 4, 4, 1)] * 8, dim=1)
    assert not torch.equal(slices, tiled)


def test_algorithm1_paper_shapes():
    z3d = torch.randn(2, 256, D)
    slices = slices_from_3d(z3d, GRID3D, N)
    assert slices.shape == (2, 32, 64, D)  # L = H/(H1 P) * W/(W1 P) = 8 * 8
    assert torch.equal(slices[:, 8:16], z3d.reshape(2, 4, 64, D)[:, 1:2].expand(2, 8, 64, D))
    with pytest.raises(ValueError, match="not a multiple"):
        slices_from_3d(z3d, GRID3D, 30)


def test_tgis_output_shapes_and_scores_sum_to_one():
    fusion = TGISFusion(D, C2D)
    z3d, feats, text = inputs()
    out = fusion(z3d, GRID3D, feats, text)
    assert out.tokens.shape == (2, 256 + 256, D)  # [z3D; z2D]
    assert fusion.out_tokens(256, L2D) == 512
    assert out.scores.shape == (2, N)
    assert torch.allclose(out.scores.sum(1), torch.ones(2))
    assert torch.equal(out.tokens[:, :256], z3d)


def test_tgis_matches_the_paper_equations():
    tau = 0.5
    fusion = TGISFusion(D, C2D, tau=tau)
    z3d, feats, text = inputs(batch=1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    out = fusion(z3d, GRID3D, feats, text, mask)
    z2d_j = fusion.projector_2d(feats)[0]                             # (N, L', D)
    z3d_j = z3d[0].reshape(4, 64, D).repeat_interleave(8, dim=0)      # Algorithm 1
    z_j = torch.stack([torch.cat([z3d_j[j], z2d_j[j]]).mean(0) for j in range(N)])  # eq. 4
    z_t = text[0, :4].mean(0)                                          # AvgPool over the question tokens
    s = torch.softmax(z_j @ z_t / tau, dim=0)                          # eqs. 5-6
    z2d = (s[:, None, None] * z2d_j).sum(0)                            # eq. 7
    assert torch.allclose(out.scores[0], s, atol=1e-6)
    assert torch.allclose(out.tokens[0], torch.cat([z3d[0], z2d]), atol=1e-5)  # eq. 8


def test_scores_change_with_the_question():
    fusion = TGISFusion(D, C2D)
    z3d, feats, text = inputs(batch=1)
    a = fusion(z3d, GRID3D, feats, text).scores
    b = fusion(z3d, GRID3D, feats, torch.randn_like(text)).scores
    assert not torch.allclose(a, b)
    assert torch.allclose(a.sum(), torch.tensor(1.0)) and torch.allclose(b.sum(), torch.tensor(1.0))


def test_gradients_reach_every_fusion_parameter_and_the_inputs():
    for inputs_ in (["text", "3d", "2d"], ["3d", "2d"]):
        fusion = TGISFusion(D, C2D, scoring_inputs=inputs_)
        z3d, feats, text = inputs()
        z3d.requires_grad_(True)
        text.requires_grad_(True)
        out = fusion(z3d, GRID3D, feats, text)
        (out.tokens * torch.randn_like(out.tokens)).sum().backward()
        missing = [n for n, p in fusion.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, missing
        assert z3d.grad.abs().sum() > 0
        if "text" in inputs_:
            assert text.grad.abs().sum() > 0  # the question steers the scores


def test_aggregation_ablations():
    z3d, feats, text = inputs()
    avg = TGISFusion(D, C2D, aggregation="avg")
    out = avg(z3d, GRID3D, feats)
    assert torch.allclose(out.scores, torch.full((2, N), 1 / N))
    assert torch.allclose(out.tokens[:, 256:], avg.projector_2d(feats).mean(1), atol=1e-6)

    mx = TGISFusion(D, C2D, aggregation="max")
    out = mx(z3d, GRID3D, feats)
    assert out.scores is None
    assert torch.equal(out.tokens[:, 256:], mx.projector_2d(feats).amax(1))

    rnd = TGISFusion(D, C2D, aggregation="random")
    a, b = rnd(z3d, GRID3D, feats).scores, rnd(z3d, GRID3D, feats).scores
    assert torch.allclose(a.sum(1), torch.ones(2)) and not torch.allclose(a, b)
    # fixed aggregations have no scorer and need no question
    assert avg.scorer is None and not avg.needs_text


@pytest.mark.parametrize("subset", [s for r in (1, 2, 3) for s in itertools.combinations(["text", "3d", "2d"], r)
                                    if s != ("text",)])
def test_scoring_input_subsets(subset):
    fusion = TGISFusion(D, C2D, scoring_inputs=subset)
    z3d, feats, text = inputs()
    out = fusion(z3d, GRID3D, feats, text if "text" in subset else None)
    assert torch.allclose(out.scores.sum(1), torch.ones(2))
    # without text, a linear layer scores each slice (paper Table 5)
    assert (fusion.scorer is None) == ("text" in subset)
    if "3d" not in subset:  # 3D features do not enter the score
        out2 = fusion(torch.randn_like(z3d), GRID3D, feats, text if "text" in subset else None)
        assert torch.allclose(out.scores, out2.scores)


def test_invalid_switches_fail_clearly():
    with pytest.raises(ValueError, match="needs '3d' and/or '2d'"):
        TGISFusion(D, C2D, scoring_inputs=["text"])
    with pytest.raises(ValueError, match="non-empty subset"):
        TGISFusion(D, C2D, scoring_inputs=[])
    with pytest.raises(ConfigError, match="aggregation: expected one of"):
        build_fusion({"name": "tgis", "aggregation": "median"}, D, C2D)
    with pytest.raises(ValueError, match="question embeddings"):
        TGISFusion(D, C2D)(*inputs()[:1], GRID3D, inputs()[1])


def test_2d_only_output_and_builder():
    fusion = build_fusion(FusionSpec(name="tgis", output="2d", scoring_inputs=["text", "2d"]), D, C2D)
    z3d, feats, text = inputs()
    out = fusion(z3d, GRID3D, feats, text)
    assert out.tokens.shape == (2, L2D, D) and fusion.out_tokens(256, L2D) == L2D
    assert build_fusion("none", D, C2D) is None
