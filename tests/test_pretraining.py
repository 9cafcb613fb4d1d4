"""3D MAE and image-text contrastive objectives: masking, the losses against their formulas, multi-worker
equivalence, the real packaged MiniLM offline, gradients."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from components.models.encoders.dcformer import DCFormerConfig, build_dcformer
from components.models.encoders.vit3d import PRESETS as VIT_PRESETS
from components.models.encoders.vit3d import ViT3D, ViT3DConfig, patchify
from components.models.pretraining.contrastive import (ContrastiveConfig, ContrastiveModel, build_contrastive,
                                                       clip_loss, default_text_encoder_path, siglip_loss)
from components.models.pretraining.mae import MAE3D, build_mae, masked_reconstruction_loss, random_masking

SMALL_VIT = ViT3DConfig(volume_size=(16, 32, 32), patch_size=(4, 8, 8), width=48, depth=2, heads=4)


def assert_every_parameter_has_grad(module: torch.nn.Module) -> None:
    missing = [n for n, p in module.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient reached: {missing}"


# ---------------------------------------------------------------- MAE

def test_random_masking_respects_the_ratio():
    ids_keep, mask, ids_restore = random_masking(3, 64, 0.75)
    assert ids_keep.shape == (3, 16) and mask.shape == (3, 64)
    assert torch.equal(mask.sum(1), torch.full((3,), 48.0))
    for b in range(3):  # the kept ids are exactly the unmasked positions
        assert set(ids_keep[b].tolist()) == set((mask[b] == 0).nonzero().flatten().tolist())
    assert not torch.equal(mask[0], mask[1])  # a fresh draw per sample


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_mae_loss_ignores_visible_patches(norm_pix_loss):
    torch.manual_seed(0)
    pred, target = torch.randn(2, 10, 6), torch.randn(2, 10, 6)
    mask = torch.zeros(2, 10)
    mask[0, [1, 4, 7]] = 1
    mask[1, [0, 2, 3, 9]] = 1
    base = masked_reconstruction_loss(pred, target, mask, norm_pix_loss)
    for tensor in (pred, target):
        changed = tensor.clone()
        changed[0, 0] += 5.0          # visible
        changed[1, 5] -= 3.0          # visible
        args = (changed, target) if tensor is pred else (pred, changed)
        assert torch.equal(masked_reconstruction_loss(*args, mask, norm_pix_loss), base)
        changed = tensor.clone()
        changed[0, 4, 2] += 1.0       # masked
        args = (changed, target) if tensor is pred else (pred, changed)
        assert not torch.isclose(masked_reconstruction_loss(*args, mask, norm_pix_loss), base)
    # the loss is the mean squared error over masked patches only
    t = target
    if norm_pix_loss:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    expected = torch.stack([((pred[b, n] - t[b, n]) ** 2).mean() for b, n in mask.nonzero().tolist()]).mean()
    assert torch.allclose(base, expected)


def test_mae_encoder_sees_only_visible_tokens_and_loss_has_no_visible_gradient():
    torch.manual_seed(0)
    mae = MAE3D(SMALL_VIT, decoder_width=32, decoder_depth=1, mask_ratio=0.75, decoder_heads=4)
    n = mae.encoder.num_tokens
    assert n == 4 * 4 * 4
    seen = []
    mae.encoder.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    volume = torch.randn(2, 1, 16, 32, 32)
    out = mae(volume)
    assert seen == [torch.Size([2, n // 4, 48])]
    assert out["pred"].shape == (2, n, 4 * 8 * 8) and out["mask"].shape == (2, n)
    assert torch.equal(out["mask"].sum(1), torch.full((2,), float(n - n // 4)))
    pred = out["pred"]
    pred.retain_grad()
    out["loss"].backward()
    visible = out["mask"] == 0
    assert pred.grad[visible].abs().max() == 0 and pred.grad[~visible].abs().sum() > 0
    assert torch.allclose(out["loss"], masked_reconstruction_loss(pred.detach(), patchify(volume, (4, 8, 8)),
                                                                  out["mask"]))


def test_mae_noise_fixes_the_mask_and_visible_tokens_are_the_lowest_noise():
    mae = MAE3D(SMALL_VIT, decoder_width=32, decoder_depth=1, mask_ratio=0.5, decoder_heads=4)
    noise = torch.rand(1, 64)
    out = mae(torch.randn(1, 1, 16, 32, 32), noise=noise)
    assert torch.equal(out["mask"][0] == 0, noise[0] <= noise[0].median())  # median: the lower middle value


@pytest.mark.parametrize("pos_embed", ["learnable", "sincos"])
def test_mae_gradients_reach_every_parameter(pos_embed):
    cfg = dataclasses.replace(SMALL_VIT, pos_embed=pos_embed)
    mae = build_mae({"encoder": dataclasses.asdict(cfg), "decoder_width": 32, "decoder_depth": 2,
                     "decoder_heads": 4, "norm_pix_loss": True, "decoder_pos_embed": pos_embed})
    mae(torch.randn(2, 1, 16, 32, 32))["loss"].backward()
    assert_every_parameter_has_grad(mae)
    assert mae.mask_token.grad.abs().sum() > 0


def test_mae_exports_a_vit_state_dict():
    mae = MAE3D(dataclasses.replace(SMALL_VIT, pos_embed="learnable"), decoder_width=32, decoder_depth=1,
                decoder_heads=4)
    mae(torch.randn(2, 1, 16, 32, 32))["loss"].backward()
    with torch.no_grad():
        for p in mae.parameters():
            p.add_(0.01 * torch.randn_like(p))  # pretend some training happened
    fresh = ViT3D(mae.config.encoder)
    fresh.load_state_dict(mae.encoder_state_dict())  # strict: same keys and shapes
    exported = mae.export_encoder()
    volume = torch.randn(1, 1, 16, 32, 32)
    fresh.eval(), exported.eval(), mae.eval()
    with torch.no_grad():
        reference = mae.encoder(volume).tokens
        assert torch.equal(fresh(volume).tokens, reference)
        assert torch.equal(exported(volume).tokens, reference)
    assert exported is not mae.encoder


def test_mae_at_e3d_geometry():
    encoder_cfg = dataclasses.replace(VIT_PRESETS["e3d_vit"], depth=1)
    mae = MAE3D(encoder_cfg, decoder_width=64, decoder_depth=1, mask_ratio=0.75, decoder_heads=4).eval()
    seen = []
    mae.encoder.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        out = mae(torch.rand(1, 1, 112, 224, 224))
    assert seen == [686]                              # 25% of 2744 tokens
    assert out["pred"].shape == (1, 2744, 8 * 16 * 16)
    assert out["mask"].sum() == 2744 - 686


# ---------------------------------------------------------------- contrastive losses

def _random_embeddings(b: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, dim, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(b, dim, generator=g, dtype=torch.float64), dim=-1)
    return x, y


def test_siglip_loss_matches_the_paper_formula():
    x, y = _random_embeddings(6, 16)
    t_prime, b = torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    for t_prime, b in [(t_prime, b), (t_prime + 0.7, b + 8.3)]:
        loss, logits = siglip_loss(x, y, t_prime, b)
        t = math.exp(t_prime.item())
        direct = 0.0
        for i in range(6):
            for j in range(6):
                z = 1.0 if i == j else -1.0
                direct += -math.log(1.0 / (1.0 + math.exp(-z * (t * float(x[i] @ y[j]) + b.item()))))
        direct /= 6
        assert loss.item() == pytest.approx(direct, rel=1e-10)
        assert logits.shape == (6, 6)


def test_clip_loss_is_cross_entropy_both_ways():
    x, y = _random_embeddings(5, 12, seed=1)
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    loss, logits = clip_loss(x, y, logit_scale)
    scaled = (x @ y.T) / 0.07
    labels = torch.arange(5)
    expected = (F.cross_entropy(scaled, labels) + F.cross_entropy(scaled.T, labels)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    direct = sum(-math.log(math.exp(scaled[i, i]) / sum(math.exp(scaled[i, k]) for k in range(5)))
                 - math.log(math.exp(scaled[i, i]) / sum(math.exp(scaled[k, i]) for k in range(5)))
                 for i in range(5)) / 10
    assert loss.item() == pytest.approx(direct, rel=1e-10)
    assert torch.allclose(logits, scaled)


def _losses_with_grads(x, y, scale, bias):
    """Each loss plus the gradients of its inputs and learnable scalars."""
    results = {}
    for name in ("siglip", "clip"):
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
        s, b = scale.clone().requires_grad_(), bias.clone().requires_grad_()
        loss = siglip_loss(xs, ys, s, b)[0] if name == "siglip" else clip_loss(xs, ys, s)[0]
        loss.backward()
        results[name] = {"loss": loss.detach(), "x": xs.grad, "y": ys.grad, "scale": s.grad,
                         "bias": b.grad if b.grad is not None else torch.zeros(())}
    return results


def _distributed_worker(rank, world_size, port, inputs, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        x = inputs["x"].chunk(world_size)[rank]
        y = inputs["y"].chunk(world_size)[rank]
        torch.save(_losses_with_grads(x, y, inputs["scale"], inputs["bias"]), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_losses_across_two_workers_equal_the_single_process_loss(tmp_path):
    world_size, batch = 2, 8
    x, y = _random_embeddings(batch, 16, seed=2)
    inputs = {"x": x, "y": y, "scale": torch.tensor(1.3, dtype=torch.float64),
              "bias": torch.tensor(-2.0, dtype=torch.float64)}
    mp.spawn(_distributed_worker, args=(world_size, _free_port(), inputs, str(tmp_path)), nprocs=world_size,
             join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(world_size)]
    reference = _losses_with_grads(x, y, inputs["scale"], inputs["bias"])
    for name in ("siglip", "clip"):
        ref = reference[name]
        # data-parallel training averages over workers: the averaged loss and gradients are the global ones
        assert torch.stack([r[name]["loss"] for r in ranks]).mean().item() == pytest.approx(ref["loss"].item(),
                                                                                        rel=1e-10)
        for key in ("scale", "bias"):
            mean_grad = torch.stack([r[name][key] for r in ranks]).mean()
            assert mean_grad.item() == pytest.approx(ref[key].item(), rel=1e-9, abs=1e-12)
        for key in ("x", "y"):
            gathered = torch.cat([r[name][key] for r in ranks]) / world_size
            assert torch.allclose(gathered, ref[key], rtol=1e-9, atol=1e-12), (name, key)


# ---------------------------------------------------------------- contrastive model with the packaged MiniLM

@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer

    path = default_text_encoder_path()
    return path, AutoTokenizer.from_pretrained(path, local_files_only=True)


REPORTS = ["No acute intrathoracic abnormality.", "A 2 cm nodule in the right upper lobe with spiculated margins."]


@pytest.mark.parametrize("loss", ["siglip", "clip"])
def test_contrastive_model_runs_with_the_packaged_minilm(minilm, loss):
    from safetensors import safe_open

    path, tokenizer = minilm
    torch.manual_seed(0)
    model = ContrastiveModel(ViT3D(SMALL_VIT), path, embed_dim=32, loss=loss).train()
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:  # pretrained, not re-initialised
        assert torch.equal(model.text_encoder.embeddings.word_embeddings.weight,
                           f.get_tensor("embeddings.word_embeddings.weight"))
    batch = tokenizer(REPORTS, padding=True, return_tensors="pt")
    out = model(torch.randn(2, 1, 16, 32, 32), batch["input_ids"], batch["attention_mask"])
    assert out["image_embeds"].shape == out["text_embeds"].shape == (2, 32)
    assert torch.allclose(out["image_embeds"].norm(dim=-1), torch.ones(2))
    assert out["logits"].shape == (2, 2) and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert_every_parameter_has_grad(model)
    if loss == "siglip":
        assert model.logit_scale.item() == pytest.approx(math.log(10)) and model.logit_bias.item() == -10
    else:
        assert model.logit_bias is None and model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_contrastive_dcformer_siglip_from_config(minilm):
    _, tokenizer = minilm
    image_encoder = build_dcformer(DCFormerConfig(volume_size=(16, 32, 32), blocks=[1, 1, 1, 1, 1],
                                                  channels=[8, 8, 16, 16, 32], kernels=[5, 5, 3, 3]))
    model = build_contrastive({"embed_dim": 24, "loss": "siglip"}, image_encoder).train()
    batch = tokenizer(REPORTS, padding=True, return_tensors="pt")
    out = model(torch.randn(2, 1, 16, 32, 32), batch["input_ids"], batch["attention_mask"])
    out["loss"].backward()
    assert_every_parameter_has_grad(model)


def test_contrastive_text_encoder_from_a_config_dict():
    text_cfg = dict(model_type="bert", vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32)
    model = ContrastiveModel(ViT3D(SMALL_VIT), text_cfg, embed_dim=8, loss="clip")
    ids = torch.randint(1, 50, (3, 7))
    out = model(torch.randn(3, 1, 16, 32, 32), ids, torch.ones_like(ids))
    out["loss"].backward()
    assert out["logits"].shape == (3, 3)
    assert_every_parameter_has_grad(model)


def test_locked_text_tower_trains_only_its_projection_and_encodes_each_report_once(minilm):
    path, tokenizer = minilm
    torch.manual_seed(0)
    model = build_contrastive({"embed_dim": 16, "loss": "clip", "text_tune": "frozen"}, ViT3D(SMALL_VIT)).train()
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    # the second batch repeats the first report in another padding: the cache keys on unpadded ids
    first = tokenizer(REPORTS, padding=True, return_tensors="pt")
    second = tokenizer([REPORTS[0]], padding="max_length", max_length=first["input_ids"].shape[1] + 3,
                       return_tensors="pt")
    out = model(torch.randn(2, 1, 16, 32, 32), first["input_ids"], first["attention_mask"])
    out["loss"].backward()
    assert_every_parameter_has_grad(model)  # image tower, both projections, temperature
    assert len(model._text_cache) == 2
    again = model.encode_text(second["input_ids"], second["attention_mask"])
    assert len(model._text_cache) == 2
    with torch.no_grad():
        model.text_encoder.eval()
        direct = model.text_encoder(**first).last_hidden_state[:, 0]
        expected = F.normalize(model.text_proj(direct), dim=-1)
    assert torch.allclose(out["text_embeds"], expected, atol=1e-5)
    assert torch.allclose(again[0], expected[0], atol=1e-5)


def test_slice_encoder_pretrains_through_attention_pooling_and_exports_for_tgis(minilm, tmp_path):
    """Med-2E3's per-slice encoder against reports: slices are pooled by learnt weights, every part
    trains, and the export loads as a VLM's ``encoder_2d`` checkpoint with the same tensors."""
    from components.models.builders import build_encoder
    from components.models.config import EncoderSpec
    from components.models.pretraining.contrastive import SliceAttentionPool
    from components.training.stages import ContrastiveStage

    _, tokenizer = minilm
    spec = EncoderSpec(name="slice2d", preset="tiny_siglip")
    head = ContrastiveConfig(embed_dim=16, loss="clip", text_tune="frozen")
    stage = ContrastiveStage(head, spec)
    torch.manual_seed(0)
    model = stage.build_model(None).train()
    assert isinstance(model.slice_pool, SliceAttentionPool)
    volume = torch.rand(2, 1, 6, 32, 32)
    features = model.image_encoder(volume)
    pooled, weights = model.slice_pool(features, return_weights=True)
    assert features.shape[:2] == (2, 6) and pooled.shape == (2, features.shape[-1])
    assert torch.allclose(weights.sum(dim=1), torch.ones(2))
    batch = tokenizer(REPORTS, padding=True, return_tensors="pt")
    model(volume, batch["input_ids"], batch["attention_mask"])["loss"].backward()
    assert_every_parameter_has_grad(model)
    # checkpoints written while the slice score had its inert bias still load
    model.slice_pool.load_state_dict({**model.slice_pool.state_dict(), "score.bias": torch.zeros(1)})

    stage.save_model(model, {k: v.detach() for k, v in model.state_dict().items()}, str(tmp_path / "model"))
    loaded = build_encoder(dataclasses.replace(spec, checkpoint=str(tmp_path)))
    want = model.image_encoder.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    assert all(torch.equal(loaded.state_dict()[k], want[k]) for k in want)
    # a 3D encoder's contrastive model has no slice pool, so its checkpoints keep their parameter names
    assert not hasattr(build_contrastive({"embed_dim": 8, "loss": "clip"}, ViT3D(SMALL_VIT)), "slice_pool")
