"""Paper-style tables and charts from result dicts."""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from components.metrics import results as R
from components.metrics.tables import (
    diagnosis_tables,
    macro_micro_tables,
    paper_tables,
    per_type_tables,
    retrieval_tables,
    text_metrics_table,
    write_tables,
)
from components.metrics.text import TextMetricResult

TYPES = ["plane", "phase", "organ", "abnormality", "location"]


def text_result(values: dict[str, list[float]]) -> TextMetricResult:
    mean = {k: sum(v) / len(v) for k, v in values.items()}
    return TextMetricResult(per_sample=values, mean=mean, settings={"bertscore": {"model_name": "test"}})


def make_run(run: str, offset: float) -> dict:
    def text(n: int) -> TextMetricResult:
        return text_result({m: [min(1.0, offset + 0.01 * i) for i in range(n)] for m in ("bleu1", "rouge1", "meteor", "bertscore_f1")})

    types = [TYPES[i % 5] for i in range(10)]
    tasks = [
        R.text_task("caption", "BIMCV-R", text(4)),
        R.text_task("caption", "CT-RATE", text(6)),
        R.text_task("vqa_open", "M3D-VQA", text(10), types),
        R.closed_vqa_task("M3D-VQA", ["A."] * 10, ["A"] * 5 + ["B"] * 5, question_types=types),
        R.diagnosis_task("CT-RATE", ["x", "x", "y", "y"], [1, 0, 1, 0], ["yes", "no", "yes", "yes"]),
        R.retrieval_task("M3D-Cap", np.eye(150) + offset, sizes=(100, 500)),
    ]
    return R.run_result(run, tasks, R.GenerationSettings())


@pytest.fixture
def runs():
    return [make_run("RadFM-like", 0.1), make_run("E3D-like", 0.3)]


def test_text_table_puts_datasets_side_by_side(runs):
    table = text_metrics_table(runs, "caption")
    assert table.columns[:3] == ["Method", "BIMCV-R BLEU-1", "BIMCV-R ROUGE-1"]
    assert len(table.columns) == 1 + 2 * 4
    assert [row[0] for row in table.rows] == ["RadFM-like", "E3D-like"]
    markdown = table.to_markdown()
    assert "| RadFM-like | 11.50 |" in markdown  # mean of 0.10..0.13 as a percentage
    assert "**31.50**" in markdown  # best per column in bold


def test_macro_micro_cells(runs):
    (table,) = macro_micro_tables(runs)
    assert table.columns == ["Method", "BLEU-1", "ROUGE-1", "METEOR", "BERT-F1", "Accuracy"]
    macro, micro = table.rows[0][-1]
    assert (macro, micro) == (pytest.approx(0.5), pytest.approx(0.5))
    assert "| 50.00/50.00 |" in table.to_markdown()
    rows = list(csv.reader(io.StringIO(table.to_csv())))
    assert rows[0] == table.columns and rows[1][-1] == "50.0000/50.0000"


def test_per_type_tables_have_type_columns_and_mean(runs):
    open_table, closed_table = per_type_tables(runs)
    assert open_table.columns == ["Method", "Metric", "Plane", "Phase", "Organ", "Abnormality", "Location", "Mean"]
    assert len(open_table.rows) == 2 * 4
    accuracy_row = closed_table.rows[0]
    assert accuracy_row[:2] == ["RadFM-like", "Accuracy"]
    # types cycle over 10 samples: plane gets samples 0 and 5 (answers A, B) -> 50 %
    assert accuracy_row[2] == pytest.approx(0.5)
    assert accuracy_row[-1] == pytest.approx(0.5)


def test_diagnosis_and_retrieval_layouts(runs):
    (diag,) = diagnosis_tables(runs)
    assert diag.columns == ["Method", "BACC", "Precision", "Recall", "F1"]
    assert diag.rows[0][1] == pytest.approx((1.0 + 0.5) / 2)
    (retr,) = retrieval_tables(runs)
    assert retr.columns == ["Direction", "R@K", "RadFM-like 100", "E3D-like 100"]  # 500 > 150 pairs: skipped
    assert [row[1] for row in retr.rows] == ["R@1", "R@5", "R@10"] * 2
    assert retr.rows[0][2] == 1.0


def test_write_tables_writes_markdown_csv_and_png(runs, tmp_path):
    paths = write_tables(runs, tmp_path)
    names = {p.name for p in paths}
    for table in paper_tables(runs):
        for suffix in (".md", ".csv", ".png"):
            assert f"{table.name}{suffix}" in names
        assert (tmp_path / f"{table.name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    combined = (tmp_path / "tables.md").read_text(encoding="utf-8")
    assert "Disease diagnosis on CT-RATE" in combined and "macro/micro" in combined


def test_missing_values_show_as_dash():
    partial = R.run_result("partial", [R.text_task("caption", "BIMCV-R", text_result({"bleu1": [0.5]}))])
    full = make_run("full", 0.2)
    table = text_metrics_table([partial, full], "caption")
    row = table.rows[0]
    assert row[0] == "partial" and None in row
    assert "| partial | 50.00 | - |" in table.to_markdown(bold_best=False)
