"""The phantom dataset: M3D-Cap/M3D-VQA layout plus a CT-RATE style label CSV."""
from __future__ import annotations

from components.data.adapters.base import quarantine, read_csv_rows, row_problem, sample, volume_id
from components.data.adapters.m3d import M3DAdapter


def diagnosis_samples(vid: str, split: str, labels: dict[str, int]) -> list[dict]:
    """E3D-GPT's diagnosis: one yes/no question per label, answered from the label table."""
    return [sample(f"{vid}#dx{i}", vid, split, "diagnosis", "Yes" if v else "No",
                   f"Does this patient have {name.lower()}?", "none", labels={name: v})
            for i, (name, v) in enumerate(labels.items())]


class PhantomAdapter(M3DAdapter):
    name = "phantom"

    def samples(self):
        out, bad = super().samples()
        rel = self.card.files.get("labels")
        if rel:
            split_of = {s["volume_id"]: s["split"] for s in out}
            for i, row in enumerate(read_csv_rows(self.card, rel, self.storage)):
                vid = volume_id(row.get("VolumeName", ""))
                problem = row_problem(row, ("VolumeName",))
                if problem or vid not in split_of:
                    why = str(problem) if problem else f"volume {vid!r} is in no split"
                    bad.append(quarantine(self.card.path(rel), "text", problem.kind if problem else "unknown_volume",
                                          f"row {i + 2}: {why}", f"{vid}#labels"))
                    continue
                labels = {k: int(v) for k, v in row.items() if k != "VolumeName"}
                out += diagnosis_samples(vid, split_of[vid], labels)
        return out, bad
