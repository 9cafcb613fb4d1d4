"""3D ViT, DCFormer and per-slice SigLIP encoders: paper geometry, the shared output contract, gradients."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses

import pytest
import torch
from torch.nn import functional as F

from components.config import ConfigError
from components.models.encoders.common import EncoderOutput, to_feature_map, to_tokens
from components.models.encoders.dcformer import (DCFormerBlock, DCFormerConfig, DecomposedConv3d, build_dcformer)
from components.models.encoders.dcformer import PRESETS as DCFORMER_PRESETS
from components.models.encoders.slice2d import Slice2DConfig, build_slice2d
from components.models.encoders.vit3d import (ViT3DConfig, build_vit3d, patchify, sincos_pos_embed_3d,
                                              unpatchify)
from components.models.encoders.vit3d import PRESETS as VIT_PRESETS


def assert_every_parameter_has_grad(module: torch.nn.Module) -> None:
    missing = [n for n, p in module.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient reached: {missing}"


# ---------------------------------------------------------------- 3D ViT

@pytest.mark.parametrize("preset, volume, grid, width", [
    ("e3d_vit", (112, 224, 224), (14, 14, 14), 1536),   # E3D-GPT: 224x224x112 (HxWxD), patch 16x16x8 -> 2744
    ("m3d_vit", (32, 256, 256), (8, 16, 16), 768),      # M3D: 32x256x256, patch 4x16x16 -> 2048
])
def test_vit_presets_match_paper_token_counts(preset, volume, grid, width):
    cfg = dataclasses.replace(VIT_PRESETS[preset], depth=1)  # depth only: geometry stays the paper's
    assert cfg.volume_size == volume and VIT_PRESETS[preset].depth == 12
    encoder = build_vit3d(cfg).eval()
    assert encoder.grid == grid and encoder.out_dim == width and encoder.stage_dims == [width]
    with torch.no_grad():
        out = encoder(torch.rand(1, 1, *volume))
    assert isinstance(out, EncoderOutput)
    n = grid[0] * grid[1] * grid[2]
    assert out.tokens.shape == (1, n, width) and out.grid == grid
    assert len(out.stages) == 1 and out.stages[0][0] is out.tokens and out.stages[0][1] == grid
    assert n == {"e3d_vit": 2744, "m3d_vit": 2048}[preset]


def test_vit_tokens_are_row_major_with_depth_slowest():
    cfg = ViT3DConfig(volume_size=(8, 12, 16), patch_size=(2, 4, 4), width=12, depth=0, heads=2,
                      pos_embed="learnable", final_norm=False)
    encoder = build_vit3d(cfg)
    with torch.no_grad():
        encoder.pos_embed.zero_()
        volume = torch.randn(2, 1, 8, 12, 16)
        out = encoder(volume)
        conv_map = encoder.patch_embed(volume)
    assert out.grid == (4, 3, 4)
    assert torch.equal(to_feature_map(out.tokens, out.grid), conv_map)
    tokens, grid = to_tokens(conv_map)
    assert grid == out.grid and torch.equal(tokens, out.tokens)
    # token index = (z * h + y) * w + x
    z, y, x = 2, 1, 3
    assert torch.equal(out.tokens[:, (z * 3 + y) * 4 + x], conv_map[:, :, z, y, x])


def test_patchify_matches_token_grid_and_round_trips():
    volume = torch.randn(2, 1, 8, 12, 16)
    patches = patchify(volume, (2, 4, 4))
    assert patches.shape == (2, 4 * 3 * 4, 2 * 4 * 4)
    z, y, x = 3, 2, 1
    block = volume[:, 0, 2 * z:2 * z + 2, 4 * y:4 * y + 4, 4 * x:4 * x + 4].reshape(2, -1)
    assert torch.equal(patches[:, (z * 3 + y) * 4 + x], block)
    assert torch.equal(unpatchify(patches, (2, 4, 4), (4, 3, 4)), volume)


def test_sincos_embedding_is_distinct_per_position():
    emb = sincos_pos_embed_3d(96, (3, 4, 5))
    assert emb.shape == (60, 96)
    assert torch.cdist(emb, emb).add(torch.eye(60) * 1e3).min() > 1e-3
    assert sincos_pos_embed_3d(50, (2, 2, 2)).shape == (8, 50)  # widths not divisible by 6 are padded


@pytest.mark.parametrize("pos_embed", ["learnable", "sincos"])
def test_vit_gradients_reach_every_parameter(pos_embed):
    cfg = dataclasses.replace(VIT_PRESETS["tiny_vit"], pos_embed=pos_embed, gradient_checkpointing=True)
    encoder = build_vit3d(cfg).train()
    encoder(torch.randn(2, 1, *cfg.volume_size)).tokens.pow(2).mean().backward()
    assert_every_parameter_has_grad(encoder)
    names = {n for n, _ in encoder.named_parameters()}
    assert ("pos_embed" in names) == (pos_embed == "learnable")


def test_vit_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="depth"):
        build_vit3d({"depth": "twelve"})
    with pytest.raises(ConfigError, match="patch_size"):
        build_vit3d({"volume_size": [30, 64, 64], "patch_size": [4, 16, 16]})
    with pytest.raises(ValueError, match="expected a"):
        build_vit3d(dataclasses.replace(VIT_PRESETS["tiny_vit"], depth=0))(torch.zeros(1, 1, 8, 8, 8))


# ---------------------------------------------------------------- DCFormer

def test_dcformer_small_matches_med3dvlm_stages():
    cfg = DCFORMER_PRESETS["dcformer_small"]
    assert (cfg.blocks, cfg.channels, cfg.kernels) == ([1, 2, 3, 6, 2], [64, 96, 192, 384, 768], [13, 11, 9, 7])
    encoder = build_dcformer("dcformer_small").eval()  # full depth: a second on CPU
    assert encoder.grid == (2, 4, 4) and encoder.out_dim == 768 and encoder.stage_dims == cfg.channels
    with torch.no_grad():
        out = encoder(torch.rand(1, 1, 128, 256, 256))
    shapes = [(tuple(t.shape), g) for t, g in out.stages]
    assert shapes == [((1, 32 * 64 * 64, 64), (32, 64, 64)), ((1, 16 * 32 * 32, 96), (16, 32, 32)),
                      ((1, 8 * 16 * 16, 192), (8, 16, 16)), ((1, 256, 384), (4, 8, 8)), ((1, 32, 768), (2, 4, 4))]
    assert out.tokens is out.stages[-1][0] and out.grid == (2, 4, 4)
    assert [g for _, g in out.stages] == encoder.stage_grids


def test_decomposed_conv_is_three_normalised_1d_depthwise_convs_summed():
    conv = DecomposedConv3d(4, 4, kernel=5, depthwise=True)
    for branch in conv.branches:  # give the norms non-trivial statistics
        bn = branch[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    conv.eval()
    x = torch.randn(2, 4, 6, 7, 8)
    expected = torch.zeros(2, 4, 6, 7, 8)
    for axis, (layer, bn) in enumerate(conv.branches):
        kernel = tuple(5 if a == axis else 1 for a in range(3))
        assert layer.kernel_size == kernel and layer.groups == 4
        y = F.conv3d(x, layer.weight, None, padding=tuple(k // 2 for k in kernel), groups=4)
        expected += F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    with torch.no_grad():
        assert torch.allclose(conv(x), expected, atol=1e-5)


def test_dcformer_block_adds_its_branch_to_the_input():
    block = DCFormerBlock(8, kernel=3, layer_scale_init=0.5).eval()
    x = torch.randn(2, 8, 4, 5, 6)
    with torch.no_grad():
        branch = block.mlp(block.spatial_mixer(x).permute(0, 2, 3, 4, 1)) * 0.5
        assert torch.allclose(block(x), x + branch.permute(0, 4, 1, 2, 3), atol=1e-6)
        block.layer_scale.zero_()
        assert torch.equal(block(x), x)


def test_dcformer_gradients_reach_every_parameter():
    cfg = DCFormerConfig(volume_size=(16, 32, 32), blocks=[1, 1, 2, 1, 1], channels=[8, 8, 16, 16, 32],
                         kernels=[5, 5, 3, 3], layer_scale_init=0.1)
    encoder = build_dcformer(cfg).train()
    out = encoder(torch.randn(2, 1, 16, 32, 32))
    assert out.grid == (1, 1, 1) == encoder.grid
    sum(t.mean() for t, _ in out.stages).backward()
    assert_every_parameter_has_grad(encoder)


def test_dcformer_config_validation():
    with pytest.raises(ConfigError, match="kernels"):
        build_dcformer({"kernels": [13, 11, 9]})
    with pytest.raises(ConfigError, match="blocks"):
        build_dcformer({"blocks": [1, 2, "three", 6, 2]})


# ---------------------------------------------------------------- per-slice SigLIP

TINY_SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8)


def test_slice_encoder_shapes_and_per_slice_independence():
    encoder = build_slice2d({"vision_config": TINY_SIGLIP, "slice_batch": 3}).eval()
    assert encoder.out_dim == 32 and encoder.num_tokens == 16 and encoder.image_size == 32
    volume = torch.rand(2, 1, 5, 40, 48)
    with torch.no_grad():
        features = encoder(volume)
        assert features.shape == (2, 5, 16, 32)
        # Slice j of sample b, alone, grey replicated to RGB and resized to the tower's size.
        b, j = 1, 3
        rgb = F.interpolate(volume[b:b + 1, :, j], size=(32, 32), mode="bilinear", align_corners=False)
        rgb = (rgb.expand(-1, 3, -1, -1) - 0.5) / 0.5
        alone = encoder.tower(pixel_values=rgb).last_hidden_state
    assert torch.allclose(features[b, j], alone[0], atol=1e-5)


def test_slice_encoder_loads_a_local_checkpoint_and_selects_layers(tmp_path):
    built = build_slice2d(Slice2DConfig(vision_config=TINY_SIGLIP)).eval()
    built.tower.save_pretrained(tmp_path / "tower")
    loaded = build_slice2d({"model_path": str(tmp_path / "tower")}).eval()
    volume = torch.rand(1, 1, 4, 32, 32)
    with torch.no_grad():
        assert torch.allclose(built(volume), loaded(volume), atol=1e-6)
        penultimate = build_slice2d({"model_path": str(tmp_path / "tower"), "select_layer": -2}).eval()(volume)
        hidden = built.tower(pixel_values=(volume[0].transpose(0, 1).expand(-1, 3, -1, -1) - 0.5) / 0.5,
                             output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(penultimate[0], hidden, atol=1e-5)


def test_slice_encoder_gradients_reach_every_parameter():
    encoder = build_slice2d("tiny_siglip").train()
    encoder(torch.rand(1, 1, 3, 32, 32)).pow(2).mean().backward()
    assert_every_parameter_has_grad(encoder)


def test_slice_encoder_needs_a_source():
    with pytest.raises(ConfigError, match="model_path"):
        build_slice2d({})
