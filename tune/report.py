"""A finished sweep's ResultGrid as the paper's table (Markdown, CSV, PNG bar chart), the per-type
tables of :mod:`components.metrics.tables`, and the best row written out as a ready recipe."""
from __future__ import annotations

import json
import os

import yaml

from components.config import load
from components.metrics.tables import Table, write_tables
from tune.config import SweepConfig
from tune.trial import EVAL_KEY, trial_row

__all__ = ["Row", "rows_of", "sweep_table", "write_report"]


class Row:
    """One trial as a table row: its labels, metrics, and how it ended."""

    def __init__(self, sweep: SweepConfig, result):
        self.variant, self.values, self.overrides = trial_row(sweep, result.config)
        self.metrics = dict(result.metrics or {})
        self.error = result.error
        labels = {v.name: v.labels for v in sweep.variants}.get(self.variant, {})
        self.labels = [self.variant or sweep.name, *(_fmt(v) for v in self.values),
                       *(labels.get(h, "") for h in _label_headers(sweep))]
        self.eval = json.loads(self.metrics[EVAL_KEY]) if EVAL_KEY in self.metrics else None

    @property
    def status(self) -> str:
        if self.error is not None:
            return f"error: {type(self.error).__name__}"
        if self.metrics.get("completed"):
            return "done"
        if "step" not in self.metrics:
            return "not run"  # e.g. pending when the sweep was interrupted; re-running resumes it
        return f"stopped early at step {self.metrics['step']}"


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _label_headers(sweep: SweepConfig) -> list[str]:
    seen: dict[str, None] = {}
    for v in sweep.variants:
        seen.update(dict.fromkeys(v.labels))
    return list(seen)


def rows_of(sweep: SweepConfig, grid) -> list[Row]:
    """Rows in the config's order (variants, then grid values); random samples by trial order."""
    order = {v.name: i for i, v in enumerate(sweep.variants)}
    rows = [Row(sweep, result) for result in grid]

    def key(row: Row):
        axes = [sweep.grid[i].values.index(v) for i, v in enumerate(row.values[:len(sweep.grid)])]
        return (order.get(row.variant, 0), axes)
    return sorted(rows, key=key)


def sweep_table(sweep: SweepConfig, rows: list[Row], with_status: bool = True) -> Table:
    """The paper's layout: rows = variants, columns = the table's metrics (+ val loss and status)."""
    headers = [sweep.table.row_header, *(a.label or a.key for a in [*sweep.grid, *sweep.search]),
               *_label_headers(sweep)]
    columns = [c.label or f"{c.task} {c.metric}" for c in sweep.table.columns]
    cells = []
    for row in rows:
        line = [*row.labels, *(row.metrics.get(c.key) for c in sweep.table.columns)]
        if with_status:
            val = row.metrics.get("val_loss")
            line += [f"{val:.4f}" if isinstance(val, float) else "-", row.status]
        cells.append(line)
    notes = [f"{sweep.name}: {len(rows)} trials; metrics on the {sweep.evaluation.split} split"
             + (f" (first {sweep.evaluation.limit} samples per task)" if sweep.evaluation.limit else "") + "."]
    return Table(name=sweep.name, title=sweep.table.title, columns=headers + columns
                 + (["Val loss", "Status"] if with_status else []), rows=cells, label_columns=len(headers),
                 notes=notes)


def best_row(sweep: SweepConfig, rows: list[Row]) -> Row | None:
    """Highest selection metric; without evaluation, the best scheduler metric."""
    key = sweep.select.key
    scored = [r for r in rows if isinstance(r.metrics.get(key), float)]
    if scored:
        return max(scored, key=lambda r: r.metrics[key])
    metric, sign = sweep.scheduler.metric, (1 if sweep.scheduler.mode == "min" else -1)
    scored = [r for r in rows if isinstance(r.metrics.get(metric), (int, float))]
    return min(scored, key=lambda r: sign * r.metrics[metric]) if scored else None


def write_best_recipe(sweep: SweepConfig, recipes: dict[str, dict], row: Row, path: str) -> str:
    """The winning row's recipe as a YAML ``ray_jobs.train_vlm`` loads (checked by loading it back)."""
    from ray_jobs.train_vlm import VLMJobConfig

    recipe = load(VLMJobConfig, data=json.loads(json.dumps(recipes[row.variant])), overrides=row.overrides)
    recipe.run.name = f"{sweep.name}-best"
    body = yaml.safe_dump(json.loads(json.dumps(_plain(recipe))), sort_keys=False)
    metric = row.metrics.get(sweep.select.key)
    header = (f"# Best row of sweep {sweep.name}: {' '.join(row.labels)}"
              f" ({sweep.select.key} = {metric})\n# python -m ray_jobs.train_vlm --config {os.path.basename(path)}\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + body)
    load(VLMJobConfig, path)
    return path


def _plain(cfg) -> dict:
    from components.config import to_dict

    data = to_dict(cfg)
    data.pop("model_preset", None)  # the model section is inline and complete
    data.pop("model_overrides", None)
    return data


def write_report(sweep: SweepConfig, recipes: dict[str, dict], grid, out_dir: str) -> dict[str, str]:
    """Write the table (md, csv, png), the per-type tables, every row as JSON and the best recipe."""
    os.makedirs(out_dir, exist_ok=True)
    rows = rows_of(sweep, grid)
    table = sweep_table(sweep, rows)
    paths = {"markdown": os.path.join(out_dir, f"{sweep.name}.md"), "csv": os.path.join(out_dir, f"{sweep.name}.csv"),
             "chart": os.path.join(out_dir, f"{sweep.name}.png"), "rows": os.path.join(out_dir, "rows.json")}
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(table.to_markdown())
    with open(paths["csv"], "w", encoding="utf-8") as f:
        f.write(table.to_csv())
    sweep_table(sweep, rows, with_status=False).plot(paths["chart"])  # bars for the metric columns only
    with open(paths["rows"], "w", encoding="utf-8") as f:
        json.dump([{"labels": r.labels, "status": r.status, "overrides": r.overrides,
                    "metrics": {k: v for k, v in r.metrics.items() if k != EVAL_KEY}} for r in rows],
                  f, indent=1, default=str)
    evaluated = [r.eval for r in rows if r.eval]
    if evaluated:
        write_tables(evaluated, os.path.join(out_dir, "eval_tables"))
        paths["eval_tables"] = os.path.join(out_dir, "eval_tables", "tables.md")
    best = best_row(sweep, rows)
    if best is not None:
        paths["best_recipe"] = write_best_recipe(sweep, recipes, best, os.path.join(out_dir, "best_recipe.yaml"))
    return paths
