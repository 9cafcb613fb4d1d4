"""Dataset cards and the adapter contract.

A card (``datasets/<name>.yaml``) says where a dataset lives and which adapter reads it;
an adapter turns the dataset's own layout into two lists: volume items (what the
preprocessing job reads) and sample records (reports, VQA, labels), plus quarantine
records for text it could not use. Adapters read text only; volumes are read in parallel
by the job.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from components.config import load
from components.data.storage import join, open_fs

TASKS = ("caption", "vqa_open", "vqa_closed", "vqa_yn", "diagnosis")
QUESTION_TYPE_NAMES = {1: "plane", 2: "phase", 3: "organ", 4: "abnormality", 5: "location"}
DATASETS_DIR = Path(__file__).resolve().parents[3] / "datasets"


@dataclass
class DatasetCard:
    """A dataset: where it is, how it is laid out, what it is for."""

    name: str
    """Short name, used in output paths and results."""
    adapter: Literal["phantom", "m3d", "ct_rate", "bimcv_r"]
    """Which adapter reads the layout."""
    root: str
    """Local folder or ``s3://bucket/prefix``; ``${VAR}`` and ``${VAR:-default}`` expand from the environment."""
    format: Literal["nifti", "dicom", "npy", "mixed"]
    """How volumes are stored."""
    splits: dict[str, str] = field(default_factory=dict)
    """Split name -> what the adapter needs for it (a file, a JSON key or a CSV)."""
    files: dict[str, str] = field(default_factory=dict)
    """Adapter-specific files relative to ``root`` (reports, labels, metadata, ...)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Adapter-specific column names, where a dataset's CSV differs between releases."""
    description: str = ""
    """What the dataset is."""
    source: str = ""
    """Where to obtain it (the access procedure)."""
    used_by: dict[str, str] = field(default_factory=dict)
    """Paper -> what that paper used the dataset for."""
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    """Train/validation/test shares for datasets without an official split."""

    def resolved_root(self) -> str:
        def sub(m):
            name, _, default = m.group(1).partition(":-")
            return os.environ.get(name, default)
        root = re.sub(r"\$\{([^}]+)\}", sub, self.root)
        if "://" not in root and not os.path.isabs(root):
            root = str((DATASETS_DIR.parent / root).resolve())
        return root

    def path(self, rel: str) -> str:
        return join(self.resolved_root(), rel)


def load_card(path_or_name: str, overrides: list[str] | None = None) -> DatasetCard:
    """A card from a YAML path or a name in ``datasets/``."""
    p = Path(path_or_name)
    if not p.suffix:
        p = DATASETS_DIR / f"{path_or_name}.yaml"
    return load(DatasetCard, p, overrides)


@dataclass
class VolumeItem:
    id: str
    source_uri: str
    format: str
    split: str
    overrides: dict = field(default_factory=dict)
    """Geometry/intensity fixes from dataset metadata (``spacing`` (x, y, z), ``slope``, ``intercept``)."""


def sample(id: str, volume_id: str, split: str, task: str, answer: str, question: str = "",
           question_type: str = "none", choices: list[str] | None = None, answer_choice: str = "",
           labels: dict | None = None) -> dict:
    """A sample record (see DESIGN.md, data contracts)."""
    assert task in TASKS, task
    return {"id": id, "volume_id": volume_id, "split": split, "task": task, "question_type": question_type,
            "question": question, "choices": list(choices or []), "answer": answer,
            "answer_choice": answer_choice, "labels": json.dumps(labels or {}, sort_keys=True)}


def quarantine(source_uri: str, stage: str, error_type: str, message: str, item_id: str = "") -> dict:
    """A quarantine record: nothing that fails is dropped silently."""
    return {"id": item_id, "source_uri": source_uri, "stage": stage, "error_type": error_type, "message": message}


def decode_text(raw: bytes, where: str) -> str:
    """UTF-8 text, refusing (not guessing) other encodings and empty reports."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextError("non_utf8", f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise TextError("empty_text", f"{where}: empty report")
    return text.strip()


class TextError(ValueError):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def read_texts(card: DatasetCard, rels: list[str], storage=None) -> dict[str, bytes | Exception]:
    """Many small text files at once (concurrent for object storage)."""
    if not rels:
        return {}
    fs, _ = open_fs(card.resolved_root(), storage)
    paths = {open_fs(card.path(r), storage)[1]: r for r in rels}
    got = fs.cat(list(paths), on_error="return")
    if not isinstance(got, dict):
        got = {next(iter(paths)): got}
    out = {}
    for p, r in paths.items():
        v = got.get(p, FileNotFoundError(p))
        out[r] = v
    return out


def read_csv_rows(card: DatasetCard, rel: str, storage=None) -> list[dict]:
    import csv
    import io

    fs, path = open_fs(card.path(rel), storage)
    with fs.open(path, "rb") as f:
        raw = f.read()
    # Undecodable bytes survive as surrogates so the rows holding them are quarantined, not the file.
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    return list(csv.DictReader(io.StringIO(text)))


def row_problem(row: dict, required: tuple[str, ...]) -> TextError | None:
    """Why a CSV row is unusable (non-UTF-8 or empty required fields), or None."""
    for k, v in row.items():
        if isinstance(v, str) and any("\udc80" <= ch <= "\udcff" for ch in v):
            return TextError("non_utf8", f"column {k!r}: not UTF-8 text")
    empty = [k for k in required if not (row.get(k) or "").strip()]
    if empty:
        return TextError("empty_text", f"empty {', '.join(empty)}")
    return None


def hashed_split(key: str, fractions: list[float]) -> str:
    """Deterministic split for datasets without an official one."""
    u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32
    if u < fractions[0]:
        return "train"
    return "validation" if u < fractions[0] + fractions[1] else "test"


def volume_id(rel_path: str) -> str:
    """A stable id from a path inside the dataset: extension dropped, separators kept."""
    rel = rel_path.strip("/")
    for ext in (".nii.gz", ".nii", ".npy"):
        if rel.endswith(ext):
            return rel[: -len(ext)]
    return rel


class Adapter:
    """Reads one dataset layout. Subclasses set ``name`` and implement the two methods."""

    name = ""

    def __init__(self, card: DatasetCard, storage=None):
        self.card = card
        self.storage = storage

    def volumes(self) -> list[VolumeItem]:
        raise NotImplementedError

    def samples(self) -> tuple[list[dict], list[dict]]:
        """``(sample records, quarantine records)``."""
        raise NotImplementedError

    def item(self, rel: str, split: str, **overrides) -> VolumeItem:
        from components.data.io import volume_format

        fmt = self.card.format if self.card.format != "mixed" else volume_format(rel)
        return VolumeItem(id=volume_id(rel), source_uri=self.card.path(rel), format=fmt, split=split,
                          overrides=overrides)

    def caption_samples(self, pairs: list[tuple[str, str, str]]) -> tuple[list[dict], list[dict]]:
        """Caption samples from ``(volume rel path, report rel path, split)``, reading the reports."""
        texts = read_texts(self.card, [t for _, t, _ in pairs], self.storage)
        out, bad = [], []
        for img, txt, split in pairs:
            raw = texts[txt]
            vid = volume_id(img)
            try:
                if isinstance(raw, Exception):
                    raise TextError("missing_text", f"{txt}: report not readable ({type(raw).__name__})")
                report = decode_text(raw, txt)
            except TextError as e:
                bad.append(quarantine(self.card.path(txt), "text", e.kind, str(e), f"{vid}#caption"))
                continue
            out.append(sample(f"{vid}#caption", vid, split, "caption", report))
        return out, bad


def get_adapter(card: DatasetCard, storage=None) -> Adapter:
    from components.data.adapters import bimcv_r, ct_rate, m3d, phantom

    table = {"phantom": phantom.PhantomAdapter, "m3d": m3d.M3DAdapter,
             "ct_rate": ct_rate.CTRateAdapter, "bimcv_r": bimcv_r.BIMCVRAdapter}
    return table[card.adapter](card, storage)
