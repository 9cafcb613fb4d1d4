"""Each adapter on tiny fixture files in the dataset's real layout."""
import csv
import json
import os

import numpy as np
import pytest

from components.data.adapters.base import DatasetCard, get_adapter, load_card
from components.data.adapters.ct_rate import volume_rel_path

CARDS = ["phantom", "m3d_cap", "m3d_vqa", "ct_rate", "ct_rate_v1", "bimcv_r"]


@pytest.mark.parametrize("name", CARDS)
def test_every_shipped_card_loads(name):
    card = load_card(name)
    assert card.used_by and card.description and card.root


def _write_csv(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_m3d_cap_and_vqa(tmp_path):
    for case in ("ct_case/000006", "ct_quizze/012345"):
        d = tmp_path / case / "Axial_C__portal_venous_phase"
        d.mkdir(parents=True)
        np.save(d / "0.npy", np.zeros((1, 4, 8, 8), np.float32))
        (tmp_path / case / "text.txt").write_text(f"Report of {case}.", encoding="utf-8")
    (tmp_path / "ct_quizze/012345/text.txt").write_bytes(b"Caf\xe9 report")  # latin-1, not UTF-8
    cap = {"train": [{"image": "ct_case/000006/Axial_C__portal_venous_phase/0.npy", "text": "ct_case/000006/text.txt"}],
           "validation": [], "test": [{"image": "ct_quizze/012345/Axial_C__portal_venous_phase/0.npy",
                                       "text": "ct_quizze/012345/text.txt"}]}
    (tmp_path / "M3D_Cap.json").write_text(json.dumps(cap), encoding="utf-8")
    _write_csv(str(tmp_path / "M3D_VQA_test.csv"), [
        {"Image Path": "ct_case/000006/Axial_C__portal_venous_phase/0.npy", "Text": "r", "Question Type": 1,
         "Question": "Which plane?", "Choice A": "Axial", "Choice B": "Coronal", "Choice C": "Sagittal",
         "Choice D": "Oblique", "Answer": "Axial", "Answer Choice": "A"},
        {"Image Path": "ct_case/000006/Axial_C__portal_venous_phase/0.npy", "Text": "r", "Question Type": 4,
         "Question": "", "Choice A": "", "Choice B": "", "Choice C": "", "Choice D": "", "Answer": "x",
         "Answer Choice": ""},
    ])
    card = DatasetCard(name="m3d", adapter="m3d", root=str(tmp_path), format="npy",
                       files={"cap_json": "M3D_Cap.json", "vqa_test": "M3D_VQA_test.csv"})
    a = get_adapter(card)
    vols = a.volumes()
    assert {v.id for v in vols} == {"ct_case/000006/Axial_C__portal_venous_phase/0",
                                    "ct_quizze/012345/Axial_C__portal_venous_phase/0"}
    samples, bad = a.samples()
    tasks = sorted(s["task"] for s in samples)
    assert tasks == ["caption", "vqa_closed", "vqa_open"]
    closed = next(s for s in samples if s["task"] == "vqa_closed")
    assert closed["question_type"] == "plane" and closed["answer_choice"] == "A" and len(closed["choices"]) == 4
    assert sorted(b["error_type"] for b in bad) == ["empty_text", "non_utf8"]


def _ct_rate_release(root, volumes: dict, stored_offset: int):
    """A CT-RATE copy: volumes of 40 HU stored as ``HU + stored_offset``, and the metadata's rescale values
    of the original scans (intercept -1024) whichever release it is."""
    import nibabel as nib

    names = {"train": ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz"], "validation": ["valid_1_a_1.nii.gz"]}
    for split, files in names.items():
        for n in files:
            p = root / volume_rel_path(volumes[split], n)
            p.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(np.full((8, 8, 4), 40 + stored_offset, np.int16), np.eye(4)), p)
    rep = "dataset/radiology_text_reports/{}_reports.csv"
    _write_csv(str(root / rep.format("train")), [
        {"VolumeName": "train_1_a_1.nii.gz", "Findings_EN": "Emphysema in both lungs.", "Impressions_EN": "x"},
        {"VolumeName": "train_2_a_1.nii.gz", "Findings_EN": "", "Impressions_EN": "x"}])
    _write_csv(str(root / rep.format("validation")), [
        {"VolumeName": "valid_1_a_1.nii.gz", "Findings_EN": "Normal.", "Impressions_EN": "x"}])
    _write_csv(str(root / "dataset/multi_abnormality_labels/train_predicted_labels.csv"), [
        {"VolumeName": "train_1_a_1.nii.gz", "Emphysema": 1, "Cardiomegaly": 0}])
    _write_csv(str(root / "dataset/metadata/train_metadata.csv"), [
        {"VolumeName": "train_1_a_1.nii.gz", "XYSpacing": "[0.75, 0.75]", "ZSpacing": 1.5,
         "RescaleSlope": 1, "RescaleIntercept": -1024}])


@pytest.mark.parametrize("card_name, volumes, stored_offset, overrides", [
    # the first release: raw scanner values behind a default header, rescaled from the metadata
    ("ct_rate_v1", {"train": "dataset/train", "validation": "dataset/valid"}, 1024,
     {"spacing": [0.75, 0.75, 1.5], "slope": 1.0, "intercept": -1024.0}),
    # the current release: CT numbers already; the metadata's intercept must not shift them again
    ("ct_rate", {"train": "dataset/train_fixed", "validation": "dataset/valid_fixed"}, 0,
     {"spacing": [0.75, 0.75, 1.5]}),
])
def test_ct_rate_releases_read_to_the_same_ct_numbers(tmp_path, card_name, volumes, stored_offset, overrides):
    from components.data.pipeline import process_item
    from components.data.preprocess import get_spec

    _ct_rate_release(tmp_path, volumes, stored_offset)
    a = get_adapter(load_card(card_name, [f"root={tmp_path}"]))
    vols = {v.id: v for v in a.volumes()}
    v = vols[f"{volumes['train']}/train_1/train_1_a/train_1_a_1"]
    assert v.overrides == overrides
    assert os.path.exists(v.source_uri)
    samples, bad = a.samples()
    assert sum(s["task"] == "caption" for s in samples) == 2
    dx = [s for s in samples if s["task"] == "diagnosis"]
    assert {s["answer"] for s in dx} == {"Yes", "No"} and len(dx) == 2
    assert [b["error_type"] for b in bad] == ["empty_text"]

    spec = get_spec({"base": "e3d", "size": [4, 8, 8]})
    rec, q = process_item(v.__dict__, spec)
    assert q is None and rec["source_spacing_mm"] == [0.75, 0.75, 1.5]
    lo, hi = spec.hu_window
    # 40 HU inside the body, whichever way the release stores it (-984 HU if rescaled twice)
    inside = rec["volume"][rec["volume"] > rec["volume"].min()]
    assert inside.size and np.allclose(inside, (40 - lo) / (hi - lo), atol=1e-3)


def test_bimcv_r_matches_volumes_by_name_and_hash_splits(tmp_path):
    """The authors' layout (volumes in CT*/ct/, a curated CSV whose path column ends in the file name,
    English reports in Report_en) with the shipped card; and a CSV of paths relative to the root."""
    import nibabel as nib

    rows, plain = [], []
    for i in range(20):
        rel = f"CT{i // 8:02d}/ct/sub-{i:03d}_ses-1_bp-chest_ct.nii.gz"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp_path / rel)
        report = f"Report {i}." if i != 3 else " "
        rows.append({"PatientID": f"sub-{i:03d}", "Report": f"Informe {i}.", "path": f"/raid/BIMCV_CT/{rel.rsplit('/', 1)[1]}",
                     "Report_en": report})
        plain.append({"volume": rel, "findings": report})
    rows.append({"PatientID": "sub-999", "Report": "x", "path": "/raid/missing_ct.nii.gz", "Report_en": "Lost."})
    (tmp_path / "meta").mkdir()
    _write_csv(str(tmp_path / "meta" / "curated_ct_report_path_En.csv"), rows)
    _write_csv(str(tmp_path / "plain.csv"), plain)
    a = get_adapter(load_card("bimcv_r", [f"root={tmp_path}"]))
    vols = a.volumes()
    found = [v for v in vols if "missing" not in v.source_uri]
    assert len(found) == 20 and all(os.path.exists(v.source_uri) for v in found) and {v.split for v in vols} >= {"train"}
    # a name the glob does not find stays as written, for the preprocessing job to quarantine as unreadable
    assert [v.source_uri for v in vols if "missing" in v.source_uri] == [str(tmp_path / "raid/missing_ct.nii.gz")]
    assert [v.split for v in vols] == [v.split for v in a.volumes()]  # stable
    samples, bad = a.samples()
    assert len(samples) == 20 and bad[0]["error_type"] == "empty_text"
    assert {s["answer"] for s in samples} >= {"Report 0.", "Lost."}  # the English column, not the Spanish one

    b = get_adapter(load_card("bimcv_r", [f"root={tmp_path}", "files={reports: plain.csv}",
                                          "columns={path: volume, report: findings}"]))
    assert sorted(v.source_uri for v in b.volumes()) == sorted(v.source_uri for v in found)
    assert {v.id: v.split for v in b.volumes()} == {v.id: v.split for v in found}  # same ids, same split


def test_phantom_adapter(phantom_dir):
    card = load_card("phantom", [f"root={phantom_dir}"])
    a = get_adapter(card)
    vols = a.volumes()
    assert len(vols) == 24 and {v.format for v in vols} == {"nifti", "dicom"}
    samples, bad = a.samples()
    assert not bad
    tasks = {s["task"] for s in samples}
    assert tasks == {"caption", "vqa_open", "vqa_closed", "vqa_yn", "diagnosis"}
    types = {s["question_type"] for s in samples if s["task"] == "vqa_closed"}
    assert types == {"plane", "phase", "organ", "abnormality", "location"}
