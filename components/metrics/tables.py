"""Paper-style tables (Markdown, CSV) and bar charts (PNG) from evaluation results.

Input: a list of result dicts, one per model/run, as :mod:`components.metrics.results`
builds them and the evaluation writes them (``results/<run>.json``). Rows are runs,
columns are metrics; values are stored as fractions and shown as percentages with two
decimals, as in the papers. The tables:

==============================  ==========================================================
table                           layout of
==============================  ==========================================================
``<task>_text_metrics``         E3D-GPT Tables 2-3 (datasets side by side), Med-2E3 Table 1,
                                Med3DVLM Table 2: BLEU-1, ROUGE-1, METEOR, BERT-F1 per run
``vqa_macro_micro__<dataset>``  Med-2E3 Table 2: open-ended text metrics and closed-ended
                                accuracy, each cell "macro/micro"
``<task>_per_type__<dataset>``  Med3DVLM Tables 3-4: one column per question type and the
                                mean over types
``diagnosis__<dataset>``        E3D-GPT Table 4: BACC, precision, recall, F1 (mean over labels)
``retrieval__<dataset>``        Med3DVLM Table 1: R@1/5/10 in both directions per test size
==============================  ==========================================================

Results JSON schema (version 1)
-------------------------------
::

    {
      "schema_version": 1,
      "run": "med3dvlm-dcformer",          # row label in every table
      "model": {"name": ..., "checkpoint": ..., ...},   # free-form description
      "created_at": "2026-01-01T00:00:00+00:00",
      "notes": "",
      "generation": {                        # GenerationSettings
        "do_sample": false,                  # a JSON boolean, never a string
        "num_beams": 1, "max_new_tokens": 256, "temperature": 1.0,
        "top_p": null, "top_k": null, "repetition_penalty": 1.0, "seed": 42
      },
      "tasks": [ <task result>, ... ]
    }

Every task result has ``task`` (``caption``, ``vqa_open``, ``vqa_closed``, ``vqa_yn``,
``diagnosis``, ``retrieval``), ``dataset``, ``split``, ``n_samples``, ``metrics`` (the
metric names it reports) and ``settings`` (everything that determines the values); results of
generated text also count the predictions ``max_new_tokens`` cut off (``truncated``), plus:

* caption / vqa_open / vqa_closed / vqa_yn::

      "micro": {"bleu1": 0.41, ...},       # mean over all samples
      "macro": {"bleu1": 0.44, ...},       # mean over question types (= micro if untyped)
      "per_type": {"plane": {"n": 120, "bleu1": 0.98, ...}, ...}

  Text tasks' ``settings`` are :meth:`TextMetricSuite.describe`: tokenizers, METEOR
  alpha/beta/gamma and WordNet version, the BERTScore model name and path, layer, idf,
  baseline rescaling, and library versions. Closed-ended VQA reports ``accuracy`` (the
  papers' "X." rule) and ``parsed_accuracy``.
* diagnosis::

      "per_label": {"Emphysema": {"balanced_accuracy": .., "precision": .., "recall": ..,
                    "f1": .., "tp": .., "fp": .., "fn": .., "tn": .., "n": ..}, ...},
      "macro": {...mean over labels...}, "micro": {...pooled...}, "n_unparsed": 0

* retrieval::

      "image_to_text": {"100": {"R@1": .., "R@5": .., "R@10": ..}, "500": {..}, ...},
      "text_to_image": {...}, "skipped_sizes": [2000]
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

from .aggregate import QUESTION_TYPES

__all__ = [
    "Table",
    "text_metrics_table",
    "macro_micro_tables",
    "per_type_tables",
    "diagnosis_tables",
    "retrieval_tables",
    "paper_tables",
    "write_tables",
]

Number = Union[float, None]
Cell = Union[str, float, None, tuple]

METRIC_LABELS = {
    "bleu1": "BLEU-1",
    "rouge1": "ROUGE-1",
    "meteor": "METEOR",
    "bertscore_f1": "BERT-F1",
    "accuracy": "Accuracy",
    "parsed_accuracy": "Parsed accuracy",
    "balanced_accuracy": "BACC",
    "precision": "Precision",
    "recall": "Recall",
    "f1": "F1",
}
TEXT_METRICS = ("bleu1", "rouge1", "meteor", "bertscore_f1")
TASK_LABELS = {
    "caption": "report generation",
    "vqa_open": "open-ended VQA",
    "vqa_closed": "closed-ended VQA",
    "vqa_yn": "yes/no VQA",
}


@dataclass
class Table:
    """A table: header labels, rows of cells; ``label_columns`` leading cells are text.

    A number cell is a fraction (shown as a percentage); a tuple cell holds several
    numbers shown joined by "/" (macro/micro); ``None`` is shown as "-".
    """

    name: str
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    label_columns: int = 1
    notes: list[str] = field(default_factory=list)
    compare_within: int | None = None
    """Label column whose equal values form the groups of rows compared for the bold best
    (e.g. the metric column); ``None`` compares all rows, ``-1`` bolds nothing."""

    def _numeric_columns(self) -> range:
        return range(self.label_columns, len(self.columns))

    def _best(self) -> set[tuple[int, int]]:
        """(row, column) of the cells to bold: the maximum of each group, unless all tie."""
        if self.compare_within == -1:
            return set()
        groups: dict[object, list[int]] = {}
        for r, row in enumerate(self.rows):
            key = None if self.compare_within is None else row[self.compare_within]
            groups.setdefault(key, []).append(r)
        best = set()
        for rows in groups.values():
            for c in self._numeric_columns():
                values = {r: self.rows[r][c] for r in rows if isinstance(self.rows[r][c], float)}
                if len(values) > 1 and len(set(values.values())) > 1:
                    top = max(values.values())
                    best |= {(r, c) for r, v in values.items() if v == top}
        return best

    def to_markdown(self, bold_best: bool = True) -> str:
        """GitHub Markdown with the title above; the best number per column in bold."""
        best = self._best() if bold_best else set()
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join(["---"] * self.label_columns + ["---:"] * (len(self.columns) - self.label_columns)) + "|"]
        for r, row in enumerate(self.rows):
            cells = []
            for c, cell in enumerate(row):
                text = _format(cell, 2)
                if (r, c) in best:
                    text = f"**{text}**"
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + [f"_{note}_" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def to_csv(self) -> str:
        """CSV with the same header; percentages with four decimals."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow([_format(cell, 4) for cell in row])
        return buffer.getvalue()

    def series(self) -> tuple[list[str], list[str], list[list[float]]]:
        """(bar labels, group labels, values in %) for the bar chart; tuples split into parts."""
        groups: list[str] = []
        parts: list[tuple[int, int | None]] = []
        for c in self._numeric_columns():
            width = max((len(row[c]) for row in self.rows if isinstance(row[c], tuple)), default=0)
            if width:
                suffixes = ["macro", "micro"] if width == 2 else [str(i) for i in range(width)]
                for i, suffix in enumerate(suffixes):
                    groups.append(f"{self.columns[c]} ({suffix})")
                    parts.append((c, i))
            else:
                groups.append(self.columns[c])
                parts.append((c, None))
        labels, values = [], []
        for row in self.rows:
            labels.append(" / ".join(str(x) for x in row[: self.label_columns]))
            line = []
            for c, i in parts:
                cell = row[c][i] if i is not None and isinstance(row[c], tuple) else row[c]
                line.append(100.0 * cell if isinstance(cell, float) else float("nan"))
            values.append(line)
        return labels, groups, values

    def plot(self, path: str | Path) -> Path:
        """A grouped bar chart (one group per column, one bar per row) as PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        labels, groups, values = self.series()
        data = np.array(values, dtype=float).reshape(len(labels), len(groups))
        width = 0.8 / max(len(labels), 1)
        x = np.arange(len(groups))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(labels)) ** 0.5 + 2), 4.5))
        for i, label in enumerate(labels):
            ax.bar(x + (i - (len(labels) - 1) / 2) * width, np.nan_to_num(data[i]), width, label=label)
        ax.set_xticks(x)
        ax.set_xticklabels(groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
        ax.set_ylabel("%")
        ax.set_title(self.title, fontsize=10)
        if labels:
            ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _format(cell: Cell, decimals: int) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, tuple):
        return "/".join(_format(part, decimals) for part in cell)
    if isinstance(cell, float):
        return f"{100.0 * cell:.{decimals}f}"
    return str(cell)


def _sentence_case(text: str) -> str:
    return text[:1].upper() + text[1:]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "dataset"


def _task_results(result: Mapping, task: str, dataset: str | None = None) -> list[Mapping]:
    return [t for t in result.get("tasks", []) if t.get("task") == task and (dataset is None or t.get("dataset") == dataset)]


def _first(result: Mapping, task: str, dataset: str) -> Mapping | None:
    found = _task_results(result, task, dataset)
    return found[0] if found else None


def _datasets(results: Sequence[Mapping], task: str) -> list[str]:
    seen: dict[str, None] = {}
    for result in results:
        for t in _task_results(result, task):
            seen.setdefault(t["dataset"], None)
    return list(seen)


def _value(values: Mapping | None, key: str) -> Number:
    if not values or key not in values:
        return None
    return float(values[key])


def _metrics_present(results: Sequence[Mapping], task: str, candidates: Iterable[str], dataset: str | None = None) -> list[str]:
    present = {m for r in results for t in _task_results(r, task, dataset) for m in t.get("metrics", [])}
    return [m for m in candidates if m in present]


def text_metrics_table(results: Sequence[Mapping], task: str = "caption", statistic: str = "micro") -> Table | None:
    """Runs x (dataset x BLEU-1/ROUGE-1/METEOR/BERT-F1), datasets side by side (E3D-GPT Tables 2-3)."""
    datasets = _datasets(results, task)
    metrics = _metrics_present(results, task, TEXT_METRICS)
    if not datasets or not metrics:
        return None
    several = len(datasets) > 1
    columns = ["Method"] + [f"{d} {METRIC_LABELS[m]}" if several else METRIC_LABELS[m] for d in datasets for m in metrics]
    rows = []
    for result in results:
        if not _task_results(result, task):
            continue
        row: list[Cell] = [result["run"]]
        for d in datasets:
            found = _first(result, task, d)
            row += [_value(found.get(statistic) if found else None, m) for m in metrics]
        rows.append(row)
    where = ", ".join(datasets)
    return Table(name=f"{task}_text_metrics", title=f"Performance of {TASK_LABELS.get(task, task)} on {where} ({statistic} average).",
                 columns=columns, rows=rows)


def macro_micro_tables(results: Sequence[Mapping]) -> list[Table]:
    """Per dataset: open-ended text metrics and closed-ended accuracy as "macro/micro" (Med-2E3 Table 2)."""
    tables = []
    datasets = list(dict.fromkeys(_datasets(results, "vqa_open") + _datasets(results, "vqa_closed") + _datasets(results, "vqa_yn")))
    for d in datasets:
        open_metrics = _metrics_present(results, "vqa_open", TEXT_METRICS, d)
        parts = [("vqa_open", m, METRIC_LABELS[m]) for m in open_metrics]
        if _metrics_present(results, "vqa_closed", ["accuracy"], d):
            parts.append(("vqa_closed", "accuracy", "Accuracy"))
        if _metrics_present(results, "vqa_yn", ["accuracy"], d):
            parts.append(("vqa_yn", "accuracy", "Yes/No accuracy"))
        rows = []
        for result in results:
            found = {task: _first(result, task, d) for task in ("vqa_open", "vqa_closed", "vqa_yn")}
            if not any(found.values()):
                continue
            row: list[Cell] = [result["run"]]
            for task, metric, _ in parts:
                t = found[task]
                row.append((_value(t.get("macro"), metric), _value(t.get("micro"), metric)) if t else None)
            rows.append(row)
        tables.append(Table(
            name=f"vqa_macro_micro__{_slug(d)}",
            title=f"VQA on {d}: open-ended text metrics and closed-ended accuracy, macro/micro average over question types.",
            columns=["Method"] + [label for _, _, label in parts], rows=rows,
            notes=["Each cell: macro-average (mean over question types) / micro-average (over samples)."],
        ))
    return tables


def per_type_tables(results: Sequence[Mapping], tasks: Sequence[str] = ("vqa_open", "vqa_closed", "vqa_yn")) -> list[Table]:
    """Per task and dataset: one column per question type plus the mean over types (Med3DVLM Tables 3-4)."""
    tables = []
    for task in tasks:
        candidates = TEXT_METRICS if task == "vqa_open" else ("accuracy", "parsed_accuracy")
        for d in _datasets(results, task):
            metrics = _metrics_present(results, task, candidates, d)
            types_seen = {ty for r in results for t in _task_results(r, task, d) for ty in t.get("per_type", {})}
            types = [ty for ty in QUESTION_TYPES if ty in types_seen] + sorted(types_seen - set(QUESTION_TYPES))
            if not metrics or not types:
                continue
            with_metric = len(metrics) > 1
            rows = []
            for result in results:
                found = _first(result, task, d)
                if not found:
                    continue
                for metric in metrics:
                    label = [result["run"]] + ([METRIC_LABELS[metric]] if with_metric else [])
                    per_type = found.get("per_type", {})
                    rows.append(label + [_value(per_type.get(ty), metric) for ty in types] + [_value(found.get("macro"), metric)])
            columns = ["Method"] + (["Metric"] if with_metric else []) + [ty.capitalize() for ty in types] + ["Mean"]
            tables.append(Table(
                name=f"{task}_per_type__{_slug(d)}",
                title=f"{_sentence_case(TASK_LABELS[task])} on {d} per question type; Mean = macro average over types.",
                columns=columns, rows=rows, label_columns=2 if with_metric else 1,
                compare_within=1 if with_metric else None,
            ))
    return tables


def diagnosis_tables(results: Sequence[Mapping]) -> list[Table]:
    """Per dataset: BACC, precision, recall, F1 averaged over labels (E3D-GPT Table 4)."""
    tables = []
    metrics = ("balanced_accuracy", "precision", "recall", "f1")
    for d in _datasets(results, "diagnosis"):
        rows = []
        for result in results:
            found = _first(result, "diagnosis", d)
            if found:
                rows.append([result["run"]] + [_value(found.get("macro"), m) for m in metrics])
        tables.append(Table(
            name=f"diagnosis__{_slug(d)}",
            title=f"Disease diagnosis on {d} (mean over labels).",
            columns=["Method"] + [METRIC_LABELS[m] for m in metrics], rows=rows,
        ))
    return tables


def retrieval_tables(results: Sequence[Mapping]) -> list[Table]:
    """Per dataset: R@K rows in both directions, one column per run and test size (Med3DVLM Table 1)."""
    tables = []
    for d in _datasets(results, "retrieval"):
        found = [(r["run"], _first(r, "retrieval", d)) for r in results if _first(r, "retrieval", d)]
        sizes = sorted({int(s) for _, t in found for direction in ("image_to_text", "text_to_image") for s in t.get(direction, {})})
        ks = list(dict.fromkeys(k for _, t in found for k in t.get("metrics", [])))
        columns = ["Direction", "R@K"] + [f"{run} {size}" for run, _ in found for size in sizes]
        rows = []
        for direction, label in (("image_to_text", "image→text (IR)"), ("text_to_image", "text→image (TR)")):
            for k in ks:
                row: list[Cell] = [label, k]
                for _, t in found:
                    row += [_value(t.get(direction, {}).get(str(size)), k) for size in sizes]
                rows.append(row)
        # sizes above a run's number of pairs have no column; say so rather than let them vanish
        skipped = [f"{run}: {', '.join(map(str, t['skipped_sizes']))} (only {t.get('n_samples')} pairs)"
                   for run, t in found if t.get("skipped_sizes")]
        tables.append(Table(
            name=f"retrieval__{_slug(d)}",
            title=f"Image-text retrieval on {d}: recall at K for each run and number of test samples.",
            columns=columns, rows=rows, label_columns=2, compare_within=-1,
            notes=["IR/TR as Med3DVLM's evaluation script labels image-query and text-query recall."]
            + ([f"Sizes skipped: {'; '.join(skipped)}."] if skipped else []),
        ))
    return tables


def paper_tables(results: Sequence[Mapping]) -> list[Table]:
    """Every table the results support, in the papers' order."""
    tables: list[Table] = []
    for task in ("caption", "vqa_open"):
        table = text_metrics_table(results, task)
        if table is not None:
            tables.append(table)
    tables += macro_micro_tables(results)
    tables += per_type_tables(results)
    tables += diagnosis_tables(results)
    tables += retrieval_tables(results)
    return tables


def write_tables(results: Sequence[Mapping], out_dir: str | Path, plots: bool = True) -> list[Path]:
    """Write ``<name>.md``, ``<name>.csv`` and ``<name>.png`` per table, and ``tables.md`` with all."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    combined = []
    for table in paper_tables(results):
        markdown = table.to_markdown()
        combined.append(markdown)
        for suffix, text in ((".md", markdown), (".csv", table.to_csv())):
            path = out / f"{table.name}{suffix}"
            path.write_text(text, encoding="utf-8")
            written.append(path)
        if plots:
            written.append(table.plot(out / f"{table.name}.png"))
    index = out / "tables.md"
    index.write_text("\n".join(combined) if combined else "No results to tabulate.\n", encoding="utf-8")
    written.append(index)
    return written
