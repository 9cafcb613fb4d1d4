"""Training jobs on a local Ray with 2 CPU workers under DeepSpeed ZeRO-2 and ZeRO-3; the loss falls;
re-running a run name resumes from its latest checkpoint. MAE runs under ZeRO-3 in the fault-tolerance
test (a lost node, a restart from the sharded checkpoint); DDP runs in the local-cluster job test
(alignment, in test_cluster_files) and the two-worker sweep trial (fine-tuning)."""
import json
import os

from components.config import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one checkpoint, at the last step (a run always saves there): the assertions read only that one
FAST = ["run.report_every_n_steps=2", "checkpoint.every_n_steps=1000", "run.epochs=50"]
# A loss on the same fixed training batches every 2 steps: one batch's loss swings more than a few
# steps move it (contrastive pairs, or a perceiver steering a frozen random LLM), this one does not.
FIXED_VAL = ["run.val_every_n_steps=2", "data.val_split=train", "data.val_batches=2"]


def _history(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _val_losses(run_dir):
    return [h["val_loss"] for h in _history(run_dir) if "val_loss" in h]


def _fit(module, cls, recipe, overrides):
    import importlib

    from ray_jobs.train_common import fit

    job_cls = getattr(importlib.import_module(f"ray_jobs.{module}"), cls)
    cfg = load(job_cls, os.path.join(ROOT, "ray_jobs/configs/cpu", recipe), overrides)
    return fit(cfg, f"ray_jobs.{module}.{cls}")


def _falls(history):
    losses = [h["loss"] for h in history]
    return sum(losses[-2:]) / 2 < losses[0], losses


def test_siglip_pretraining_learns_under_deepspeed_zero2(train_shards, tmp_path, ray_local, capfd, monkeypatch):
    from ray.data import DataContext

    # as in a terminal: the driver's own Ray Data pipelines draw progress bars
    monkeypatch.setattr(DataContext.get_current(), "enable_progress_bars", True)
    # the features of both ranks are gathered for the loss, so every pair of the global batch counts;
    # a contrastive loss depends on which pairs share a batch: one batch's loss swings 2-4x step to step
    _fit("pretrain_contrastive", "ContrastiveJobConfig", "siglip.yaml", [
        f"data.path={train_shards}", f"run.storage_path={tmp_path}", "run.name=siglip", "run.max_steps=8",
        *FIXED_VAL, "strategy.name=deepspeed", "strategy.zero_stage=2", *FAST])
    val = _val_losses(tmp_path / "siglip")
    assert len(val) == 4 and val[-1] < val[0], val
    # the run's progress is its own step lines, not a Ray Data bar line per refresh from the split coordinator
    out = capfd.readouterr()
    lines = (out.out + out.err).splitlines()
    assert any("[train] step " in line for line in lines)
    assert not [line for line in lines if "Queued blocks" in line or "row/s]" in line]


def _export_matches_training(summary) -> dict:
    """Reload the exported VolumeVLM and compare every weight with DeepSpeed's own reassembly of the
    ZeRO-3 partitions it checkpointed: an independent account of the weights training ended with."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from components.models.vlm import VolumeVLM

    trained = get_fp32_state_dict_from_zero_checkpoint(os.path.join(summary["checkpoint"], "deepspeed"), tag="state")
    reloaded = VolumeVLM.from_pretrained(summary["model_dir"]).state_dict()
    assert trained and set(trained) <= set(reloaded), sorted(set(trained) - set(reloaded))[:5]
    for key, value in trained.items():
        assert reloaded[key].shape == value.shape and torch.equal(reloaded[key], value), key
    return trained


def _deepspeed_steps(ckpt: str) -> int:
    """Optimizer steps counted by DeepSpeed's engine: restored from the checkpoint when a run resumes."""
    import torch

    path = os.path.join(ckpt, "deepspeed", "state", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    return torch.load(path, map_location="cpu", weights_only=False)["global_steps"]


ZERO3 = ["strategy.name=deepspeed", "strategy.zero_stage=3"]


def test_vlm_align_then_finetune_under_zero3_export_whole_weights_and_resume(train_shards, tmp_path, ray_local):
    import torch

    base = [f"data.path={train_shards}", f"run.storage_path={tmp_path}", *ZERO3, *FAST]
    # through a frozen random LLM the perceiver moves the loss by hundredths, less than one batch differs
    # from the next
    align = _fit("train_vlm", "VLMJobConfig", "align.yaml", base + ["run.name=align", "run.max_steps=10", *FIXED_VAL])
    val = _val_losses(tmp_path / "align")
    assert len(val) == 5 and val[-1] < val[0], val
    assert os.path.exists(os.path.join(align["model_dir"], "config.yaml"))
    aligned = _export_matches_training(align)
    # the frozen parts were partitioned too (all but the smallest tensors): they are exported whole
    assert any(k.startswith("llm.") and v.numel() > 10**6 for k, v in aligned.items())
    # per-part learning rates become DeepSpeed parameter groups
    ft = base + ["run.name=finetune", f"run.init_from={tmp_path / 'align'}", "optim.lr_scale={perceiver: 2.0}"]
    first = _fit("train_vlm", "VLMJobConfig", "finetune.yaml", ft + ["run.max_steps=10"])
    falls, losses = _falls(_history(tmp_path / "finetune"))
    assert falls, losses
    assert os.path.isdir(os.path.join(first["model_dir"], "llm_adapter"))
    tuned = _export_matches_training(first)  # perceiver + LoRA gathered from both ranks' partitions
    lora_b = sorted(k for k in tuned if "lora_B" in k)
    assert lora_b and all(tuned[k].abs().sum() > 0 for k in lora_b)  # LoRA B starts at zero: these trained
    # same run name, longer: continues from the step-10 ZeRO-3 checkpoint, DeepSpeed's state included
    second = _fit("train_vlm", "VLMJobConfig", "finetune.yaml", ft + ["run.max_steps=12"])
    history = _history(tmp_path / "finetune")
    assert [h["step"] for h in history][-2:] == [10, 12] and history[-1]["resumed_from"] == 10
    assert _deepspeed_steps(second["checkpoint"]) == 12
    resumed = _export_matches_training(second)
    assert not torch.equal(resumed[lora_b[0]], tuned[lora_b[0]])
