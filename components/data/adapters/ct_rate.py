"""CT-RATE: NIfTI volumes, a reports CSV and a multi-abnormality label CSV per split.

Layout: ``dataset/<volumes>/<split>_<patient>/<split>_<patient>_<scan>/<name>.nii.gz``, where
``<volumes>`` is ``train_fixed``/``valid_fixed`` in the current release and ``train``/``valid`` in the
first; ``dataset/radiology_text_reports/<split>_reports.csv`` (VolumeName, Findings_EN, ...),
``dataset/multi_abnormality_labels/<split>_predicted_labels.csv`` (VolumeName + 18 label columns) and
``dataset/metadata/<split>_metadata.csv`` (XYSpacing, ZSpacing, RescaleSlope, RescaleIntercept, ...).

The metadata's spacing always replaces the header's. Its rescale values are applied only when the card
names their columns (``columns.rescale_slope``/``rescale_intercept``): the first release stored raw
scanner values behind a default header, the current one stores CT numbers already, and rescaling
those again would shift every voxel by the intercept.
"""
from __future__ import annotations

import ast

from components.data.adapters.base import Adapter, quarantine, read_csv_rows, row_problem, sample, volume_id
from components.data.adapters.phantom import diagnosis_samples
from components.data.storage import exists


def volume_rel_path(volumes_dir: str, name: str) -> str:
    """``train_1_a_1.nii.gz`` -> ``<volumes_dir>/train_1/train_1_a/train_1_a_1.nii.gz``."""
    parts = name.split("_")
    return f"{volumes_dir.rstrip('/')}/{'_'.join(parts[:2])}/{'_'.join(parts[:3])}/{name}"


class CTRateAdapter(Adapter):
    name = "ct_rate"

    def _split_files(self, split: str) -> dict:
        f = self.card.files
        out = {k: f.get(f"{k}_{split}") for k in ("reports", "labels", "metadata", "volumes")}
        for optional in ("labels", "metadata"):  # not every copy of the release has them for every split
            if out[optional] and not exists(self.card.path(out[optional]), self.storage):
                out[optional] = None
        return out

    def _metadata(self, rel: str | None) -> dict[str, dict]:
        if not rel:
            return {}
        slope_col, intercept_col = self.card.columns.get("rescale_slope"), self.card.columns.get("rescale_intercept")
        out = {}
        for row in read_csv_rows(self.card, rel, self.storage):
            try:
                xy = ast.literal_eval(row["XYSpacing"]) if row.get("XYSpacing") else None
                fix = {}
                if xy and row.get("ZSpacing"):
                    fix["spacing"] = [float(xy[0]), float(xy[1]), float(row["ZSpacing"])]
                if slope_col and row.get(slope_col):
                    fix["slope"] = float(row[slope_col])
                    fix["intercept"] = float(row.get(intercept_col) or 0.0) if intercept_col else 0.0
                out[row["VolumeName"]] = fix
            except (ValueError, SyntaxError, KeyError):
                continue  # the volume is still read with its own header
        return out

    def volumes(self):
        items = []
        for split in self.card.splits:
            files = self._split_files(split)
            meta = self._metadata(files["metadata"])
            for row in read_csv_rows(self.card, files["reports"], self.storage):
                name = row.get("VolumeName", "")
                if name:
                    items.append(self.item(volume_rel_path(files["volumes"], name), split, **meta.get(name, {})))
        return items

    def samples(self):
        out, bad = [], []
        col = self.card.columns.get("report", "Findings_EN")
        for split in self.card.splits:
            files = self._split_files(split)
            for i, row in enumerate(read_csv_rows(self.card, files["reports"], self.storage)):
                vid = volume_id(volume_rel_path(files["volumes"], row.get("VolumeName", "")))
                problem = row_problem(row, ("VolumeName", col))
                if problem:
                    bad.append(quarantine(self.card.path(files["reports"]), "text", problem.kind,
                                          f"row {i + 2}: {problem}", f"{vid}#caption"))
                    continue
                out.append(sample(f"{vid}#caption", vid, split, "caption", row[col].strip()))
            if files["labels"]:
                for i, row in enumerate(read_csv_rows(self.card, files["labels"], self.storage)):
                    vid = volume_id(volume_rel_path(files["volumes"], row.get("VolumeName", "")))
                    problem = row_problem(row, ("VolumeName",))
                    if problem:
                        bad.append(quarantine(self.card.path(files["labels"]), "text", problem.kind,
                                              f"row {i + 2}: {problem}", f"{vid}#labels"))
                        continue
                    labels = {k: int(float(v)) for k, v in row.items() if k != "VolumeName" and v not in ("", None)}
                    out += diagnosis_samples(vid, split, labels)
        return out, bad
