"""M3D-Cap (a JSON of image/text paths per split) and M3D-VQA (CSV per split).

M3D-Cap: ``{"train": [{"image": "M3D_Cap_npy/ct_case/000006/<series>.npy",
"text": "M3D_Cap_npy/ct_case/000006/text.txt"}], ...}``, one ``.npy`` per series as the M3D code's
``m3d_cap_data_prepare.py`` writes them (the release itself holds PNG slices).
M3D-VQA: columns ``Image Path, Text, Question Type, Question, Choice A..D, Answer, Answer Choice``;
every row yields a closed (4-choice) and an open sample; yes/no CSVs yield ``vqa_yn`` samples.
"""
from __future__ import annotations

import json

from components.data.adapters.base import (QUESTION_TYPE_NAMES, Adapter, quarantine, read_csv_rows, row_problem,
                                           sample, volume_id)
from components.data.storage import open_fs

_SPLIT_KEYS = {"train": "train", "validation": "validation", "test": "test"}


def question_type_name(value) -> str:
    """M3D writes the question type as 1-5; some exports write the name."""
    s = str(value).strip()
    if s.isdigit():
        return QUESTION_TYPE_NAMES.get(int(s), s)
    return s.lower() or "none"


class M3DAdapter(Adapter):
    name = "m3d"

    def _cap_json(self) -> dict | None:
        rel = self.card.files.get("cap_json")
        if not rel:
            return None
        fs, path = open_fs(self.card.path(rel), self.storage)
        with fs.open(path, "rb") as f:
            return json.load(f)

    def _vqa_tables(self) -> list[tuple[str, str, list[dict]]]:
        """``(split, kind, rows)`` for every VQA CSV named by the card (``vqa_<split>``, ``vqa_yn_<split>``)."""
        out = []
        for key, rel in self.card.files.items():
            for kind in ("vqa_yn_", "vqa_"):
                if key.startswith(kind):
                    split = key[len(kind):]
                    out.append((split, kind.rstrip("_"), read_csv_rows(self.card, rel, self.storage)))
                    break
        return out

    def volumes(self):
        seen = {}
        cap = self._cap_json()
        if cap:
            for split, key in _SPLIT_KEYS.items():
                for entry in cap.get(key, []):
                    seen.setdefault(entry["image"], split)
        for split, _, rows in self._vqa_tables():
            for row in rows:
                seen.setdefault(row["Image Path"], split)
        return [self.item(rel, split) for rel, split in seen.items()]

    def samples(self):
        out, bad = [], []
        cap = self._cap_json()
        if cap:
            pairs = [(e["image"], e["text"], split) for split, key in _SPLIT_KEYS.items() for e in cap.get(key, [])]
            got, lost = self.caption_samples(pairs)
            out += got
            bad += lost
        for split, kind, rows in self._vqa_tables():
            for i, row in enumerate(rows):
                vid = volume_id(row["Image Path"])
                qtype = question_type_name(row.get("Question Type", ""))
                sid = f"{vid}#{kind}{i}"
                problem = row_problem(row, ("Question", "Answer"))
                if problem:
                    where = self.card.path(self.card.files.get(f"{kind}_{split}", ""))
                    bad.append(quarantine(where, "text", problem.kind, f"row {i + 2}: {problem}", sid))
                    continue
                question, answer = row["Question"].strip(), row["Answer"].strip()
                if kind == "vqa_yn":
                    out.append(sample(sid, vid, split, "vqa_yn", answer, question, qtype))
                    continue
                choices = [row.get(f"Choice {c}", "") for c in "ABCD"]
                letter = (row.get("Answer Choice") or "").strip()
                if all(choices) and letter in ("A", "B", "C", "D"):
                    out.append(sample(sid + "c", vid, split, "vqa_closed", answer, question, qtype, choices, letter))
                out.append(sample(sid + "o", vid, split, "vqa_open", answer, question, qtype))
        return out, bad
