"""BIMCV-R: CT volumes in ``CT*`` folders and one reports CSV (``BIMCV-R.csv``).

The release has no official split, so volumes are split by a hash of their path with the
card's ``split_fractions``. Column names are taken from the card (``columns.path``,
``columns.report``) because they differ between copies of the release.
"""
from __future__ import annotations

from components.data.adapters.base import (Adapter, hashed_split, quarantine, read_csv_rows, row_problem, sample,
                                           volume_id)


class BIMCVRAdapter(Adapter):
    name = "bimcv_r"

    def _rows(self):
        return read_csv_rows(self.card, self.card.files["reports"], self.storage)

    def _cols(self):
        return self.card.columns.get("path", "path"), self.card.columns.get("report", "report")

    def volumes(self):
        path_col, _ = self._cols()
        seen = {}
        for row in self._rows():
            rel = (row.get(path_col) or "").strip()
            if rel:
                seen.setdefault(rel, hashed_split(rel, self.card.split_fractions))
        return [self.item(rel, split) for rel, split in seen.items()]

    def samples(self):
        path_col, report_col = self._cols()
        out, bad = [], []
        for i, row in enumerate(self._rows()):
            rel = (row.get(path_col) or "").strip()
            vid = volume_id(rel)
            problem = row_problem(row, (path_col, report_col))
            if problem:
                bad.append(quarantine(self.card.path(self.card.files["reports"]), "text", problem.kind,
                                      f"row {i + 2}: {problem}", f"{vid}#caption"))
                continue
            out.append(sample(f"{vid}#caption", vid, hashed_split(rel, self.card.split_fractions), "caption",
                              row[report_col].strip()))
        return out, bad
