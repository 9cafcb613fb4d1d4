"""What one sweep trial runs: the training job's loop on the row's recipe, then the evaluation the
jobs use (``components.evaluation.evaluate_split``) on the validation split, both reported to Tune.

A recipe with ``scaling.num_workers > 1`` trains through ``ray_jobs.train_common.fit`` (a
TorchTrainer started inside this trial, its reports forwarded to Tune); with one worker the loop
runs here, in the trial's own process, reading the shards directly (``ShardBatches``), and its
checkpoints go through Tune, so a restored trial continues from its last one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from components.config import from_dict, load, to_dict
from components.data.storage import is_remote, join
from tune.config import SweepConfig, override

__all__ = ["run_trial", "trial_row", "flat_metrics", "TuneSession"]

EVAL_KEY = "eval_result"
"""Reported metric holding the trial's whole results dict (JSON): the per-type tables need it."""


def trial_row(sweep: SweepConfig, config: dict) -> tuple[str, list, list[str]]:
    """``(variant name, grid and search values, extra overrides)`` of a trial's Tune config."""
    values, extra = [], []
    for kind, axes in (("grid", sweep.grid), ("search", sweep.search)):
        for i, axis in enumerate(axes):
            value = config[kind][str(i)]
            values.append(value)
            extra.append(override(axis.key, value))
    return config.get("variant", ""), values, extra


def flat_metrics(result: dict) -> dict[str, float]:
    """``task/statistic/metric`` -> value for every averaged metric of a results dict (and ``task/n_samples``)."""
    out = {}
    for task in result["tasks"]:
        if "n_samples" in task:
            out[f"{task['task']}/n_samples"] = task["n_samples"]
        for statistic in ("micro", "macro"):
            for metric, value in (task.get(statistic) or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[f"{task['task']}/{statistic}/{metric}"] = float(value)
    return out


class TuneSession:
    """The loop's session inside a one-worker trial: shard batches in, reports and checkpoints to Tune."""

    world_rank, world_size = 0, 1

    def __init__(self, train_rows, val_rows, seed: int, shuffle_buffer: int, device: str, kept: str):
        import torch

        self.device = torch.device(device)
        self.train_rows, self.val_rows = train_rows, val_rows
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.kept = kept  # a folder the caller owns and removes
        self.has_model = False

    def latest_checkpoint(self):
        from ray import tune

        from ray_jobs.train_common import checkpoint_directory

        return checkpoint_directory(tune.get_checkpoint())

    def batches(self, epoch: int, batch_size: int):
        return self.train_rows(batch_size, seed=self.seed * 1000 + epoch, shuffle_buffer=self.shuffle_buffer)

    def val_batches(self, batch_size: int):
        return self.val_rows(batch_size)

    def report(self, metrics: dict, checkpoint_dir: str | None = None):
        from ray import tune

        if checkpoint_dir:  # the loop deletes its folder after this call; keep the model to evaluate
            self._keep(os.path.join(checkpoint_dir, "model"))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    def _keep(self, model_dir: str):
        target = os.path.join(self.kept, "model")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(model_dir, target)
        self.has_model = True

    def model_dir(self) -> str:
        """The final model: the last checkpoint this trial wrote, or the one it was restored at."""
        if not self.has_model:
            with self.latest_checkpoint() as ckpt:
                if ckpt is None:
                    raise RuntimeError("the trial wrote no checkpoint and restored none")
                self._keep(os.path.join(ckpt, "model"))
        return os.path.join(self.kept, "model")


def _device(cfg) -> str:
    import torch

    return "cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu"


def _train_here(cfg, kept: str) -> tuple[TuneSession, dict]:
    from components.training.loop import TrainerState, plan_steps, train
    from components.training.shards import ShardBatches

    stage = cfg.make_stage()
    storage = to_dict(cfg.storage)
    tasks = stage.tasks if stage.needs_samples else None
    train_rows = ShardBatches(cfg.data.path, cfg.data.split, tasks, storage, cfg.data.limit)
    val_rows = (ShardBatches(cfg.data.path, cfg.data.val_split, tasks, storage)
                if cfg.run.val_every_n_steps is not None else None)
    session = TuneSession(train_rows, val_rows, cfg.run.seed, cfg.data.shuffle_buffer, _device(cfg), kept)
    micro, total = plan_steps(cfg, train_rows.rows, 1)
    final = train(session, cfg, stage, micro, total)
    if not final:  # restored after its last step (interrupted while evaluating): nothing was left to train
        with session.latest_checkpoint() as ckpt:
            final = {"step": TrainerState.read(ckpt).step} if ckpt else {}
    return session, final


def _train_distributed(cfg, sweep: SweepConfig) -> tuple[str, dict]:
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_jobs.train_common import fit

    # one Train run per trial, named by the trial: a restored trial's trainer resumes that run
    base = sweep.storage_path if is_remote(sweep.storage_path) else os.path.abspath(sweep.storage_path)
    cfg.run.storage_path = join(base, sweep.name, "train_runs")
    if is_remote(base) and not any(to_dict(cfg.storage).values()):
        cfg.storage = sweep.storage  # the recipe names no object store: use the sweep's
    summary = fit(cfg, "ray_jobs.train_vlm.VLMJobConfig", callbacks=[TuneReportCallback()])
    return summary["model_dir"], dict(summary["final"] or {})


def _evaluate(model_dir: str, cfg, sweep: SweepConfig, label: str) -> dict:
    from components.evaluation import evaluate_split, load_model
    from components.metrics.results import GenerationSettings

    ev, storage = sweep.evaluation, to_dict(cfg.storage)
    model = load_model(model_dir, storage, device=_device(cfg))
    settings = GenerationSettings(max_new_tokens=ev.max_new_tokens, seed=cfg.run.seed)
    # one call per task: a sample limit then holds for every task, not for the split's first task
    parts = [evaluate_split(model, cfg.data.path, split=ev.split, tasks=(task,), settings=settings, limit=ev.limit,
                            batch_size=ev.batch_size, run=label, storage=storage)["result"] for task in ev.tasks]
    return {**parts[0], "tasks": [t for part in parts for t in part["tasks"]]}


def run_trial(config: dict, sweep: dict, recipes: dict[str, dict]) -> None:
    """Tune function trainable: ``config`` picks the row; ``sweep`` and ``recipes`` come from the driver."""
    import torch
    from ray import tune

    from ray_jobs.train_vlm import VLMJobConfig

    sweep_cfg = from_dict(SweepConfig, sweep)
    variant, values, extra = trial_row(sweep_cfg, config)
    cfg = load(VLMJobConfig, data=json.loads(json.dumps(recipes[variant])), overrides=extra)
    cfg.run.name = f"{sweep_cfg.name}-{tune.get_context().get_trial_id()}"
    # the model a trial keeps to evaluate goes with the trial, whether it finished, failed or was stopped
    with tempfile.TemporaryDirectory(prefix="radray-trial-") as kept:
        if cfg.scaling.num_workers > 1:
            model_dir, final = _train_distributed(cfg, sweep_cfg)
        else:
            # as many threads as the trial reserved CPUs: concurrent trials must not oversubscribe the cores
            torch.set_num_threads(max(1, int(sweep_cfg.resources_per_trial.get("CPU", 1))))
            session, final = _train_here(cfg, kept)
            model_dir = session.model_dir()
        # "completed" marks the trial's last report: a trial the scheduler stopped never sends it
        metrics = {"completed": True, **{k: final[k] for k in ("step", "loss", "val_loss") if k in final}}
        if sweep_cfg.evaluation.enabled:
            label = " ".join([variant, *(str(v) for v in values)]).strip() or sweep_cfg.name
            result = _evaluate(model_dir, cfg, sweep_cfg, label)
            metrics.update(flat_metrics(result))
            metrics[EVAL_KEY] = json.dumps(result)
    tune.report(metrics)
