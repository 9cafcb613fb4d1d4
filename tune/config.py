"""Typed sweep configs: a base training recipe, the rows of a paper's ablation table as recipe
overrides, how Tune searches and schedules them, and which metrics make the table's columns.

    cfg, recipes = load_sweep("tune/e3d_perceivers.yaml", ["num_samples=2"])

``recipes`` maps every grid row (variant) to its fully resolved ``VLMJobConfig`` as a plain dict;
a bad override in any row fails here, at load time, with the row and the field named.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from components.config import ConfigError, load, to_dict
from components.data.storage import StorageConfig, is_remote
from ray_jobs.common import RayConfig

__all__ = ["SweepConfig", "Variant", "GridAxis", "SearchSpace", "SchedulerSection", "EvaluationSection",
           "Column", "TableSection", "load_sweep", "recipes_of", "variant_recipe", "override"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Variant:
    """One row of the paper's table: its name and the recipe overrides that make it."""

    name: str
    """Row label (e.g. ``Global Q-Former``)."""
    overrides: list[str] = field(default_factory=list)
    """``key.sub=value`` changes to the base recipe (e.g. ``model.perceiver.name=qformer_global``)."""
    labels: dict[str, str] = field(default_factory=dict)
    """Extra label cells of this row, by column header (e.g. Med-2E3 Table 5's Text / 3D / 2D ticks)."""


@dataclass
class GridAxis:
    """A recipe key every value of which is tried with every other grid axis and variant."""

    key: str
    """Recipe key, e.g. ``optim.lr``."""
    values: list[Any]
    """Values to try."""
    label: str | None = None
    """Column header of this axis in the table; null = the key."""

    def __post_init__(self):
        if not self.values:
            raise ValueError("values: a grid axis needs at least one value")


@dataclass
class SearchSpace:
    """A recipe key sampled at random, ``num_samples`` times per grid point."""

    key: str
    """Recipe key, e.g. ``optim.lr``."""
    sampler: Literal["uniform", "loguniform", "randint", "lograndint", "choice"]
    """Tune's sampler of the same name."""
    low: float | None = None
    """Lower bound (uniform, loguniform, randint, lograndint)."""
    high: float | None = None
    """Upper bound (exclusive for the integer samplers)."""
    values: list[Any] = field(default_factory=list)
    """Candidates for ``choice``."""
    label: str | None = None
    """Column header in the table; null = the key."""

    def __post_init__(self):
        if self.sampler == "choice":
            if not self.values:
                raise ValueError("values: sampler 'choice' needs values")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"low/high: sampler {self.sampler!r} needs low < high")

    def example(self) -> Any:
        """A value in the space, to check at load time that the key fits the recipe."""
        if self.sampler == "choice":
            return self.values[0]
        return int(self.low) if self.sampler in ("randint", "lograndint") else self.low


@dataclass
class SchedulerSection:
    """Trial scheduling: run every trial to the end, or stop the worst early with ASHA."""

    name: Literal["none", "asha"] = "none"
    """``asha``: asynchronous successive halving on ``metric``."""
    metric: str = "val_loss"
    """Reported metric ASHA compares (the recipe needs ``run.val_every_n_steps`` for val_loss)."""
    mode: Literal["min", "max"] = "min"
    """Whether lower or higher ``metric`` is better."""
    time_attr: str = "step"
    """Progress measure of the rungs: optimizer steps."""
    grace_period: int = 1
    """No trial stops before this much progress."""
    reduction_factor: float = 2.0
    """Share of trials kept at each rung is 1 / reduction_factor."""
    max_t: int = 1_000_000
    """Progress at which any trial stops."""
    brackets: int = 1
    """Number of ASHA brackets."""


@dataclass
class EvaluationSection:
    """The evaluation each trial runs on its final model (the same ``evaluate_split`` the jobs use)."""

    enabled: bool = True
    """Evaluate each trial; false = rank by the scheduler metric alone."""
    split: str = "validation"
    """Split to evaluate on (the test split stays untouched by model selection)."""
    tasks: list[str] = field(default_factory=lambda: ["caption", "vqa_open", "vqa_closed"])
    """Tasks to generate and score."""
    limit: int | None = None
    """First N samples per task (smoke runs); null = all."""
    max_new_tokens: int = 256
    """Generation length."""
    batch_size: int = 8
    """Generation batch."""


@dataclass
class Column:
    """One metric column of the table."""

    task: str
    """``caption``, ``vqa_open``, ``vqa_closed``, ``vqa_yn``."""
    metric: str
    """``bleu1``, ``rouge1``, ``meteor``, ``bertscore_f1``, ``accuracy``, ..."""
    statistic: Literal["micro", "macro"] = "micro"
    """Average over samples (micro) or over question types (macro)."""
    label: str | None = None
    """Header; null = task and metric."""

    @property
    def key(self) -> str:
        """Name of the metric in every trial's reported results."""
        return f"{self.task}/{self.statistic}/{self.metric}"


@dataclass
class TableSection:
    """The paper table the sweep reproduces."""

    title: str
    """Caption of the rendered table."""
    columns: list[Column]
    """Metric columns, in the paper's order."""
    select: Column | None = None
    """Metric that picks the best variant (higher is better); null = the first column."""
    row_header: str = "Method"
    """Header of the variant-name column."""

    def __post_init__(self):
        if not self.columns:
            raise ValueError("columns: a table needs at least one metric column")


@dataclass
class SweepConfig:
    """A Ray Tune sweep over training recipes: one trial per row (x grid point x random sample)."""

    name: str
    """Experiment name: results go to ``<storage_path>/<name>``; re-running resumes it."""
    recipe: str
    """Base ``ray_jobs.train_vlm`` recipe (YAML path, relative to the repository root or the working directory)."""
    table: TableSection
    """The table the sweep renders."""
    recipe_overrides: list[str] = field(default_factory=list)
    """Changes to the base recipe shared by every row."""
    data_path: str | None = None
    """Preprocessed shards of any dataset card (local or s3://) replacing the recipe's ``data.path``."""
    variants: list[Variant] = field(default_factory=list)
    """Named rows, searched with ``tune.grid_search``; empty = one unnamed row (the base recipe)."""
    grid: list[GridAxis] = field(default_factory=list)
    """Further grid axes (crossed with the variants)."""
    search: list[SearchSpace] = field(default_factory=list)
    """Random-search keys, sampled ``num_samples`` times per grid point."""
    num_samples: int = 1
    """Tune's num_samples: repeats of the whole grid (with fresh random samples)."""
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    """none or ASHA."""
    max_concurrent_trials: int = 0
    """Trials running at once; 0 = as many as the resources allow."""
    resources_per_trial: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    """What each trial's own process reserves. A trial with ``scaling.num_workers > 1`` runs a
    TorchTrainer whose workers reserve their own resources, so give it little here."""
    reuse_actors: bool = True
    """Run consecutive trials in the same process (saves the imports and model-library start per trial)."""
    storage_path: str = "runs/sweeps"
    """Local folder or s3:// prefix of the experiment (trial results, checkpoints)."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage settings for s3:// paths."""
    resume: Literal["auto", "never"] = "auto"
    """``auto``: an existing experiment of this name is restored (finished trials are not rerun)."""
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    """Per-trial evaluation."""
    output_dir: str | None = None
    """Local folder of the table, chart and best recipe; null = ``results/sweeps/<name>``."""
    ray: RayConfig = field(default_factory=RayConfig)
    """How to reach Ray."""

    def __post_init__(self):
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variants: names must be unique, got {names}")
        if self.num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        if self.max_concurrent_trials < 0:
            raise ValueError("max_concurrent_trials must be >= 0")

    @property
    def select(self) -> Column:
        return self.table.select or self.table.columns[0]


def resolve_path(path: str) -> str:
    """A path as given if it exists, else relative to the repository root."""
    return path if os.path.isabs(path) or os.path.exists(path) else os.path.join(ROOT, path)


def variant_recipe(cfg: SweepConfig, variant: Variant | None, extra: list[str] = ()) -> dict:
    """The resolved recipe (plain dict) of one row plus ``extra`` overrides; ConfigError names the row."""
    from ray_jobs.train_vlm import VLMJobConfig

    overrides = [*cfg.recipe_overrides, *(variant.overrides if variant else []), *extra]
    if cfg.data_path:
        overrides.append(override("data.path", cfg.data_path))
    where = f"variants ({variant.name})" if variant else "recipe"
    try:
        # the model inline first (a model_preset resolved), so rows can override model.* keys
        base = to_dict(load(VLMJobConfig, resolve_path(cfg.recipe)))
        base.pop("model_preset"), base.pop("model_overrides")
        recipe = load(VLMJobConfig, data=base, overrides=overrides)
    except ConfigError as e:
        raise ConfigError(f"{where}: {cfg.recipe}: {e}") from None
    changes_model = [o for o in overrides if o.startswith("model.") and not o.startswith("model.tune.")]
    if recipe.run.init_from and changes_model:
        # a stage-2 start loads the checkpoint's own model: the row's change would be silently lost
        raise ConfigError(f"{where}: run.init_from: a row that changes the model ({changes_model[0]}) must "
                          f"train from scratch; set run.init_from=null")
    # trials run in other processes (and folders): local paths must not depend on this one's
    for section, name in ((recipe.data, "path"), (recipe.run, "init_from")):
        value = getattr(section, name)
        if value and not is_remote(value):
            setattr(section, name, os.path.abspath(value))
    return to_dict(recipe)


def override(key: str, value: Any) -> str:
    """A ``key=value`` override whose value survives YAML parsing unchanged."""
    return f"{key}={json.dumps(value)}"


def recipes_of(cfg: SweepConfig) -> dict[str, dict]:
    """Every row's resolved recipe, keyed by variant name ("" without variants); all validated."""
    # one example value per grid axis and search key: a key the recipe lacks fails now, not in a trial
    probe = [override(a.key, a.values[0]) for a in cfg.grid] + [override(s.key, s.example()) for s in cfg.search]
    recipes = {}
    for variant in cfg.variants or [None]:
        variant_recipe(cfg, variant, probe)
        recipes[variant.name if variant else ""] = variant_recipe(cfg, variant)
    return recipes


def load_sweep(path: str, overrides: list[str] | None = None) -> tuple[SweepConfig, dict[str, dict]]:
    """The sweep config and every row's resolved recipe."""
    cfg = load(SweepConfig, path, overrides)
    return cfg, recipes_of(cfg)
