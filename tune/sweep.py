"""Ray Tune ablation sweeps: each reproduces the rows of a paper's ablation table.

    python -m tune.sweep --config tune/e3d_perceivers.yaml [key.sub=value ...]

Every row (variant x grid point x random sample) is one Tune trial that trains the row's
``ray_jobs.train_vlm`` recipe and evaluates it (see :mod:`tune.trial`); at the end the
ResultGrid is written as the paper's table (Markdown, CSV, PNG) with the best row as a ready
recipe, and their paths are printed. Re-running an interrupted sweep (same name and storage)
restores it with ``Tuner.restore``: finished trials are kept, unfinished ones continue, and ASHA
keeps the rung records of the trials before the interruption (:mod:`tune.asha`).
"""
from __future__ import annotations

import os
import sys

from components.config import ConfigError, parse_cli, to_dict
from components.data.storage import is_remote, join, pyarrow_fs
from ray_jobs.common import init_ray
from tune.config import SweepConfig, recipes_of
from tune.report import write_report
from tune.trial import run_trial

__all__ = ["param_space", "scheduler", "experiment_path", "build_tuner", "run_sweep", "main"]


def param_space(cfg: SweepConfig) -> dict:
    """Tune's search space: grid_search over the named rows and each grid axis; samplers for the rest."""
    from ray import tune

    space: dict = {"grid": {str(i): tune.grid_search(a.values) for i, a in enumerate(cfg.grid)},
                   "search": {}}
    if cfg.variants:
        space["variant"] = tune.grid_search([v.name for v in cfg.variants])
    for i, s in enumerate(cfg.search):
        sampler = getattr(tune, s.sampler)
        space["search"][str(i)] = sampler(s.values) if s.sampler == "choice" else sampler(s.low, s.high)
    return space


def scheduler(cfg: SweepConfig):
    """ASHA (its rungs saved next to the experiment, so a resumed sweep keeps them) or None."""
    from tune.asha import STATE_FILE, ResumableASHA

    s = cfg.scheduler
    if s.name == "none":
        return None
    base = cfg.storage_path if is_remote(cfg.storage_path) else os.path.abspath(cfg.storage_path)
    return ResumableASHA(join(base, cfg.name, STATE_FILE), to_dict(cfg.storage), time_attr=s.time_attr,
                         metric=s.metric, mode=s.mode, max_t=s.max_t, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, brackets=s.brackets)


def experiment_path(cfg: SweepConfig) -> tuple[str, object, str]:
    """``(storage_path for RunConfig, pyarrow filesystem or None, experiment folder)``."""
    if is_remote(cfg.storage_path):
        pfs, path = pyarrow_fs(cfg.storage_path, to_dict(cfg.storage))
        return path, pfs, f"{path.rstrip('/')}/{cfg.name}"
    path = os.path.abspath(cfg.storage_path)
    return path, None, os.path.join(path, cfg.name)


def build_tuner(cfg: SweepConfig, recipes: dict[str, dict]):
    """A new Tuner, or the restored one when ``resume: auto`` finds the experiment."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=to_dict(cfg), recipes=recipes),
                                    dict(cfg.resources_per_trial))
    storage_path, pfs, exp = experiment_path(cfg)
    if cfg.resume == "auto" and tune.Tuner.can_restore(exp, storage_filesystem=pfs):
        print(f"[sweep] resuming {exp}", flush=True)
        return tune.Tuner.restore(exp, trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=pfs), True
    asha = scheduler(cfg)
    if asha is not None:
        asha.forget()
    tune_config = tune.TuneConfig(num_samples=cfg.num_samples, scheduler=asha,
                                  max_concurrent_trials=cfg.max_concurrent_trials or None,
                                  reuse_actors=cfg.reuse_actors,
                                  trial_dirname_creator=lambda t: f"trial_{t.trial_id}")
    run_config = tune.RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=pfs,
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=1))
    return tune.Tuner(trainable, param_space=param_space(cfg), tune_config=tune_config, run_config=run_config), False


def run_sweep(cfg: SweepConfig, recipes: dict[str, dict] | None = None) -> dict:
    """Run (or resume) the sweep and write its report; returns the output paths and the ResultGrid."""
    recipes = recipes if recipes is not None else recipes_of(cfg)
    init_ray(cfg.ray)
    # val_loss arrives only on validation steps and the table metrics only at the end; ASHA skips
    # results without its metric, but Tune's strict check would fail the trial on the first one
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # trials keep the working directory (relative model paths in recipes), not their trial folder
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    tuner, resumed = build_tuner(cfg, recipes)
    grid = tuner.fit()
    out_dir = cfg.output_dir or os.path.join("results", "sweeps", cfg.name)
    paths = write_report(cfg, recipes, grid, out_dir)
    _, _, exp = experiment_path(cfg)
    print(f"[sweep] {cfg.name}: {len(grid)} trials ({grid.num_errors} errors){' after resuming' if resumed else ''}; "
          f"experiment {exp}", flush=True)
    for what, path in paths.items():
        print(f"[sweep] {what}: {path}", flush=True)
    return {"paths": paths, "grid": grid, "resumed": resumed, "experiment": exp}


def main(argv=None):
    cfg = parse_cli(SweepConfig, argv, description=__doc__.splitlines()[0])
    try:
        recipes = recipes_of(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2)
    run_sweep(cfg, recipes)


if __name__ == "__main__":
    main()
