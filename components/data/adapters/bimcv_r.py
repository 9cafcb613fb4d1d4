"""BIMCV-R: CT volumes in ``CT*/ct/`` folders and one reports CSV.

The release has no official split, so volumes are split by a hash of their path with the
card's ``split_fractions``. Column names are taken from the card (``columns.path``,
``columns.report``) because they differ between copies of the release. With ``files.volumes`` (a
glob under the root) the path column is matched by file name against the volumes found there, as
the dataset's authors load it; without it the column holds paths relative to the root.
"""
from __future__ import annotations

import functools
import posixpath

from components.data.adapters.base import (Adapter, hashed_split, quarantine, read_csv_rows, row_problem, sample,
                                           volume_id)
from components.data.storage import open_fs


class BIMCVRAdapter(Adapter):
    name = "bimcv_r"

    def _rows(self):
        return read_csv_rows(self.card, self.card.files["reports"], self.storage)

    def _cols(self):
        return self.card.columns.get("path", "path"), self.card.columns.get("report", "Report_en")

    @functools.cached_property
    def _by_name(self) -> dict[str, str] | None:
        """File name -> path relative to the root, of the volumes ``files.volumes`` finds (None: no glob)."""
        pattern = self.card.files.get("volumes")
        if not pattern:
            return None
        fs, root = open_fs(self.card.resolved_root(), self.storage)
        root = root.rstrip("/")
        return {posixpath.basename(p): posixpath.relpath(p, root) for p in sorted(fs.glob(f"{root}/{pattern}"))}

    def _rel(self, row: dict) -> str:
        value = (row.get(self._cols()[0]) or "").strip()
        names = self._by_name
        if names is None or not value:
            return value
        # a name not found stays as written: the preprocessing job quarantines it as unreadable
        return names.get(posixpath.basename(value.replace("\\", "/")), value)

    def volumes(self):
        seen = {}
        for row in self._rows():
            rel = self._rel(row)
            if rel:
                seen.setdefault(rel, hashed_split(rel, self.card.split_fractions))
        return [self.item(rel, split) for rel, split in seen.items()]

    def samples(self):
        path_col, report_col = self._cols()
        out, bad = [], []
        for i, row in enumerate(self._rows()):
            rel = self._rel(row)
            vid = volume_id(rel)
            problem = row_problem(row, (path_col, report_col))
            if problem:
                bad.append(quarantine(self.card.path(self.card.files["reports"]), "text", problem.kind,
                                      f"row {i + 2}: {problem}", f"{vid}#caption"))
                continue
            out.append(sample(f"{vid}#caption", vid, hashed_split(rel, self.card.split_fractions), "caption",
                              row[report_col].strip()))
        return out, bad
