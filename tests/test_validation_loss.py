"""The loop's periodic validation pass, without Ray: when it runs, what it reports, and bad settings."""
import numpy as np
import pytest

from components.config import ConfigError, from_dict, load
from components.training.config import TrainingSections
from components.training.loop import LocalSession, plan_steps, train
from components.training.stages import MAEStage

TINY_MAE = {"encoder": {"volume_size": [16, 32, 32], "patch_size": [4, 8, 8], "width": 32, "depth": 1, "heads": 2},
            "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2}


def _rows(n, seed):
    rng = np.random.default_rng(seed)
    base = np.zeros((1, 16, 32, 32), np.float32)
    base[:, 4:12, 8:24, 8:24] = 1.0
    return [{"id": f"v{seed}_{i}", "volume": base + 0.05 * rng.standard_normal(base.shape).astype(np.float32)}
            for i in range(n)]


def _setup(val_every, val_batches=2):
    from components.models.pretraining.mae import MAEConfig

    cfg = from_dict(TrainingSections, {
        "data": {"batch_size": 4, "augment": {"enabled": False}, "val_batches": val_batches},
        "optim": {"lr": 3e-3}, "checkpoint": {"every_n_steps": 100},
        "run": {"report_every_n_steps": 3, "epochs": 100, "max_steps": 12, "val_every_n_steps": val_every}})
    return cfg, MAEStage(from_dict(MAEConfig, TINY_MAE))


class CountingSession(LocalSession):
    reads = 0

    def val_batches(self, batch_size):
        self.reads += 1
        return super().val_batches(batch_size)


def test_validation_runs_on_its_cadence_and_at_the_end_and_falls(tmp_path):
    cfg, stage = _setup(val_every=4)
    session = CountingSession(_rows(16, 0), str(tmp_path / "ckpt"), val_rows=_rows(12, 1))
    micro, total = plan_steps(cfg, 16, 1)
    train(session, cfg, stage, micro, total)
    by_step = {r["step"]: r for r in session.reports}
    # reports every 3 steps plus one at each validation step (4, 8, 12 = the last)
    assert sorted(by_step) == [3, 4, 6, 8, 9, 12]
    assert [s for s, r in sorted(by_step.items()) if "val_loss" in r] == [4, 8, 12]
    val = [by_step[s]["val_loss"] for s in (4, 8, 12)]
    assert all(np.isfinite(val)) and val[-1] < val[0], val
    assert session.reads == 1  # three passes over the same batches, read once


def test_validation_is_deterministic_and_leaves_the_model_training(tmp_path):
    from components.training.engine import build_engine
    from components.training.validation import read_validation_batches, validation_loss

    import torch

    cfg, stage = _setup(val_every=1, val_batches=2)
    session = LocalSession([], str(tmp_path / "c"), val_rows=_rows(12, 1))
    engine = build_engine(stage.build_model(None), cfg.optim, cfg.strategy, 10, torch.device("cpu"), 1, 4)
    engine.module.train()
    batches = read_validation_batches(session, cfg.data)
    assert len(batches) == 2
    torch.manual_seed(0)
    first = validation_loss(session, stage, engine, batches)
    torch.manual_seed(0)
    assert validation_loss(session, stage, engine, batches) == pytest.approx(first)
    assert engine.module.training


def test_no_validation_rows_is_an_error_naming_the_split(tmp_path):
    cfg, stage = _setup(val_every=2)
    session = LocalSession(_rows(16, 0), str(tmp_path / "ckpt"), val_rows=[])
    micro, total = plan_steps(cfg, 16, 1)
    with pytest.raises(RuntimeError, match="no validation batches in split 'validation'"):
        train(session, cfg, stage, micro, total)


def test_bad_validation_cadence_fails_at_load_naming_the_field():
    with pytest.raises(ConfigError, match=r"run.*val_every_n_steps"):
        load(TrainingSections, data={"run": {"val_every_n_steps": 0}})
    with pytest.raises(ConfigError, match=r"data.val_batches: expected int"):
        load(TrainingSections, data={"data": {"val_batches": "many"}})
