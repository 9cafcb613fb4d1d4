"""Perceivers: paper token counts, output-size bookkeeping and gradient flow."""
import pytest
import torch

from components.config import ConfigError
from components.models.builders import PERCEIVERS, build_encoder, build_perceiver
from components.models.config import PerceiverSpec
from components.models.encoders.common import EncoderOutput
from components.models.perceivers import (Conv3dPerceiver, DualStreamMixerPerceiver, MixerLayer,
                                          SpatialPoolMLPPerceiver, tokens_to_volume, volume_to_tokens)

torch.manual_seed(0)


def fake_output(stages, batch=2):
    """EncoderOutput with random tokens for a list of (width, grid) stages, coarsest last."""
    tensors = [(torch.randn(batch, g[0] * g[1] * g[2], c), tuple(g)) for c, g in stages]
    return EncoderOutput(tokens=tensors[-1][0], grid=tensors[-1][1], stages=tensors)


def test_grid_round_trip_is_row_major():
    vol = torch.arange(3 * 4 * 5).reshape(1, 1, 3, 4, 5).float()
    tokens = volume_to_tokens(vol)
    assert tokens[0, :, 0].tolist() == list(range(60))  # d slowest, w fastest
    assert torch.equal(tokens_to_volume(tokens, (3, 4, 5)), vol)


def test_conv3d_e3d_gpt_2744_to_343():
    # E3D-GPT geometry: 224x224x112 volume, patch 16x16x8 -> 14^3 tokens. Width and depth reduced.
    encoder = build_encoder({"name": "vit3d", "preset": "e3d_vit", "overrides": {"width": 48, "heads": 4, "depth": 1}})
    assert encoder.grid == (14, 14, 14)
    perceiver = build_perceiver(PerceiverSpec(name="conv3d", k=2), 40, encoder)
    assert isinstance(perceiver, Conv3dPerceiver)
    with torch.no_grad():
        enc = encoder(torch.rand(1, 1, 112, 224, 224))
        out = perceiver(enc)
    assert enc.tokens.shape == (1, 2744, 48)
    assert out.shape == (1, 343, 40)
    assert perceiver.num_tokens == 343 and perceiver.out_grid() == (7, 7, 7)


def test_conv3d_merges_each_kxkxk_block_into_one_token():
    perceiver = Conv3dPerceiver(1, 1, (4, 4, 4), k=2)
    with torch.no_grad():
        perceiver.conv.weight.fill_(1.0)
        perceiver.conv.bias.zero_()
    vol = torch.zeros(1, 1, 4, 4, 4)
    vol[0, 0, 2:4, 0:2, 2:4] = 1.0  # the block at (1, 0, 1) of the 2x2x2 output grid
    out = perceiver(EncoderOutput(volume_to_tokens(vol), (4, 4, 4)))
    expected = torch.zeros(8)
    expected[1 * 4 + 0 * 2 + 1] = 8.0
    assert torch.equal(out[0, :, 0], expected)


def test_spatial_pool_mlp_m3d_2048_to_256():
    encoder = build_encoder({"name": "m3d_vit", "overrides": {"width": 32, "heads": 4, "depth": 1}})
    assert encoder.grid == (8, 16, 16)
    perceiver = build_perceiver("spatial_pool_mlp", 24, encoder)
    assert isinstance(perceiver, SpatialPoolMLPPerceiver)
    with torch.no_grad():
        enc = encoder(torch.rand(1, 1, 32, 256, 256))
        out = perceiver(enc)
    assert enc.tokens.shape[1] == 2048
    assert out.shape == (1, 256, 24) and perceiver.num_tokens == 256 and perceiver.out_grid() == (4, 8, 8)
    # avg-pool then Linear -> GELU -> Linear
    assert [type(m).__name__ for m in perceiver.proj] == ["Linear", "GELU", "Linear"]


def test_dual_stream_mixer_med3dvlm_256_plus_32_to_256():
    enc = fake_output([(384, (4, 8, 8)), (768, (2, 4, 4))], batch=2)
    assert enc.stages[0][0].shape == (2, 256, 384) and enc.stages[1][0].shape == (2, 32, 768)
    perceiver = DualStreamMixerPerceiver(64, [(384, (4, 8, 8)), (768, (2, 4, 4))])
    out = perceiver(enc)
    assert out.shape == (2, 256, 64) and perceiver.num_tokens == 256
    # low stream 256 -> 192 -> 128 tokens, high 32 -> 64 -> 128; widths D/2 then D
    low = [(m.token_mlp[0].in_features, m.token_mlp[-1].out_features, m.channel_mlp[-1].out_features)
           for m in perceiver.low]
    high = [(m.token_mlp[0].in_features, m.token_mlp[-1].out_features, m.channel_mlp[-1].out_features)
            for m in perceiver.high]
    assert low == [(256, 192, 32), (192, 128, 64)]
    assert high == [(32, 64, 32), (64, 128, 64)]
    # the first 128 output tokens come from the low stream only
    enc2 = EncoderOutput(enc.tokens, enc.grid, [(enc.stages[0][0], enc.stages[0][1]),
                                                (torch.randn_like(enc.stages[1][0]), enc.stages[1][1])])
    out2 = perceiver(enc2)
    assert torch.allclose(out[:, :128], out2[:, :128]) and not torch.allclose(out[:, 128:], out2[:, 128:])


def test_dual_stream_mlp_is_the_2xmlp_h_row_every_token_of_both_stages():
    enc = fake_output([(384, (4, 8, 8)), (768, (2, 4, 4))], batch=2)
    perceiver = build_perceiver(PerceiverSpec(name="dual_stream_mlp"), 64, in_dim=768, grid=(2, 4, 4),
                                stages=[(384, (4, 8, 8)), (768, (2, 4, 4))])
    out = perceiver(enc)
    assert out.shape == (2, 256 + 32, 64) and perceiver.num_tokens == 288
    # 2x: Linear -> GELU -> Linear per stream; token-wise, so the low tokens map one to one
    assert [type(m).__name__ for m in perceiver.low] == ["Linear", "GELU", "Linear"]
    assert torch.allclose(out[:, :256], perceiver.low(enc.stages[0][0]))
    assert torch.allclose(out[:, 256:], perceiver.high(enc.stages[1][0]))


def test_dual_stream_mixer_on_dcformer_stages():
    encoder = build_encoder({"name": "dcformer", "preset": "dcformer_small",
                             "overrides": {"volume_size": [64, 128, 128], "blocks": [1, 1, 1, 1, 1]}})
    perceiver = build_perceiver("dual_stream_mixer", 32, encoder)
    with torch.no_grad():
        out = perceiver(encoder(torch.rand(1, 1, 64, 128, 128)))
    assert out.shape == (1, 256, 32)


def test_mixer_layer_follows_med3dvlm_equations():
    layer = MixerLayer(6, 4, 8, 10)
    x = torch.randn(3, 6, 8)
    u = layer.token_mlp(layer.token_norm(x).transpose(1, 2))  # U = W2 s(W1 Norm(X)^T): (B, d, n_out)
    y = layer.channel_mlp(layer.channel_norm(u.transpose(1, 2)))  # Y = W4 s(W3 Norm(U^T))
    assert torch.allclose(layer(x), y) and y.shape == (3, 4, 10)
    assert MixerLayer(4, 4, 8, 8).residual and not layer.residual


GRID, WIDTH, LLM = (4, 8, 8), 32, 24
STAGES = [(16, (8, 16, 16)), (WIDTH, GRID)]
SPECS = {
    "conv3d": PerceiverSpec(name="conv3d", k=2),
    "qformer_global": PerceiverSpec(name="qformer_global", out_tokens=20, heads=4, depth=1),
    "qformer_local": PerceiverSpec(name="qformer_local", k=2, queries_per_window=2, heads=4, depth=1),
    "mlp_mixer": PerceiverSpec(name="mlp_mixer", out_tokens=40, depth=2),
    "dual_stream_mixer": PerceiverSpec(name="dual_stream_mixer", low_tokens=[48, 16], high_tokens=[24, 16]),
    "dual_stream_mlp": PerceiverSpec(name="dual_stream_mlp"),
    "avg_pool": PerceiverSpec(name="avg_pool", k=2),
    "max_pool": PerceiverSpec(name="max_pool", k=2),
    "spatial_pool_mlp": PerceiverSpec(name="spatial_pool_mlp", k=2),
    "linear": PerceiverSpec(name="linear"),
    "mlp2x": PerceiverSpec(name="mlp2x"),
}
EXPECTED_TOKENS = {"conv3d": 32, "qformer_global": 20, "qformer_local": 64, "mlp_mixer": 40, "dual_stream_mixer": 32,
                   "dual_stream_mlp": 8 * 16 * 16 + 4 * 8 * 8,
                   "avg_pool": 32, "max_pool": 32, "spatial_pool_mlp": 32, "linear": 256, "mlp2x": 256}


def test_every_registered_perceiver_is_covered():
    assert set(SPECS) == set(PERCEIVERS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_perceiver_shape_and_gradients(name):
    perceiver = build_perceiver(SPECS[name], LLM, in_dim=WIDTH, grid=GRID, stages=STAGES)
    enc = fake_output(STAGES, batch=2)
    out = perceiver(enc)
    assert out.shape == (2, EXPECTED_TOKENS[name], LLM)
    assert perceiver.num_tokens == perceiver.out_tokens(GRID) == EXPECTED_TOKENS[name]
    (out * torch.randn_like(out)).sum().backward()
    params = [(n, p) for n, p in perceiver.named_parameters() if p.requires_grad]
    assert params
    missing = [n for n, p in params if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"


def test_bad_perceiver_name_and_grid_fail_clearly():
    with pytest.raises(ConfigError, match="unknown perceiver 'conv4d'"):
        build_perceiver("conv4d", 8, in_dim=8, grid=(2, 2, 2))
    with pytest.raises(ConfigError, match="not divisible by k=2"):
        build_perceiver("conv3d", 8, in_dim=8, grid=(3, 4, 4))
