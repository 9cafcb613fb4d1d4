"""Every training job on a local Ray with 2 CPU workers, under DDP and DeepSpeed ZeRO; the loss falls;
re-running a run name resumes from its latest checkpoint."""
import json
import os

import pytest

from components.config import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["run.report_every_n_steps=2", "checkpoint.every_n_steps=4", "run.epochs=50"]


def _history(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _fit(module, cls, recipe, overrides):
    import importlib

    from ray_jobs.train_common import fit

    job_cls = getattr(importlib.import_module(f"ray_jobs.{module}"), cls)
    cfg = load(job_cls, os.path.join(ROOT, "ray_jobs/configs/cpu", recipe), overrides)
    return fit(cfg, f"ray_jobs.{module}.{cls}")


def _falls(history):
    losses = [h["loss"] for h in history]
    return sum(losses[-2:]) / 2 < losses[0], losses


def test_mae_ddp_learns_and_a_rerun_resumes(train_shards, tmp_path, ray_local):
    common = [f"data.path={train_shards}", f"run.storage_path={tmp_path}", "run.name=mae", *FAST]
    summary = _fit("pretrain_mae", "MAEJobConfig", "mae.yaml", common + ["run.max_steps=8"])
    falls, losses = _falls(_history(tmp_path / "mae"))
    assert falls, losses
    assert os.path.exists(os.path.join(summary["model_dir"], "encoder.safetensors"))
    assert os.path.exists(summary["loss_curve"]) and os.listdir(summary["tensorboard"])
    # same name, longer run: continues at step 8 instead of starting again
    _fit("pretrain_mae", "MAEJobConfig", "mae.yaml", common + ["run.max_steps=12"])
    steps = [h["step"] for h in _history(tmp_path / "mae")]
    assert steps == [2, 4, 6, 8, 10, 12], steps
    last = sorted(d for d in os.listdir(tmp_path / "mae")
                  if d.startswith("checkpoint_") and os.path.isdir(tmp_path / "mae" / d))[-1]
    with open(tmp_path / "mae" / last / "trainer_state.json", encoding="utf-8") as f:
        assert json.load(f)["step"] == 12


def test_mae_deepspeed_zero3(train_shards, tmp_path, ray_local):
    summary = _fit("pretrain_mae", "MAEJobConfig", "mae.yaml", [
        f"data.path={train_shards}", f"run.storage_path={tmp_path}", "run.name=mae-z3", "run.max_steps=8",
        "strategy.name=deepspeed", "strategy.zero_stage=3", *FAST])
    falls, losses = _falls(_history(tmp_path / "mae-z3"))
    assert falls, losses
    ckpt = summary["checkpoint"]
    assert os.path.isdir(os.path.join(ckpt, "deepspeed"))  # sharded optimizer state of both ranks
    from safetensors.torch import load_file

    enc = load_file(os.path.join(summary["model_dir"], "encoder.safetensors"))
    assert all(v.numel() > 0 for v in enc.values())  # ZeRO-3 partitions were gathered, not saved empty


@pytest.mark.parametrize("strategy", [["strategy.name=ddp"], ["strategy.name=deepspeed", "strategy.zero_stage=2"]],
                         ids=["ddp", "zero2"])
def test_siglip_pretraining_learns(strategy, train_shards, tmp_path, ray_local):
    _fit("pretrain_contrastive", "ContrastiveJobConfig", "siglip.yaml", [
        f"data.path={train_shards}", f"run.storage_path={tmp_path}", "run.name=siglip", "run.max_steps=8",
        *strategy, *FAST])
    falls, losses = _falls(_history(tmp_path / "siglip"))
    assert falls, losses


def test_vlm_align_with_ddp_then_finetune_with_zero2(train_shards, tmp_path, ray_local):
    base = [f"data.path={train_shards}", f"run.storage_path={tmp_path}", *FAST]
    align = _fit("train_vlm", "VLMJobConfig", "align.yaml", base + ["run.name=align", "run.max_steps=10"])
    falls, losses = _falls(_history(tmp_path / "align"))
    assert falls, losses
    assert os.path.exists(os.path.join(align["model_dir"], "config.yaml"))
    ft = _fit("train_vlm", "VLMJobConfig", "finetune.yaml",
              base + ["run.name=finetune", "run.max_steps=10", f"run.init_from={tmp_path / 'align'}"])
    falls, losses = _falls(_history(tmp_path / "finetune"))
    assert falls, losses
    from components.models.vlm import VolumeVLM

    model = VolumeVLM.from_pretrained(ft["model_dir"])
    assert model.tune_mode("llm") == "lora" and os.path.isdir(os.path.join(ft["model_dir"], "llm_adapter"))
