"""The phantom dataset: deterministic, balanced, learnable, in the published layouts."""
import collections
import csv
import json
import os

import numpy as np

from components.data.phantom import LABELS, PhantomConfig, make_phantom_dataset, read_findings


def _rows(root, name):
    with open(os.path.join(root, name), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_layout_and_splits_by_volume(phantom_dir):
    cap = json.load(open(os.path.join(phantom_dir, "M3D_Cap.json"), encoding="utf-8"))
    images = {s: {e["image"] for e in cap[s]} for s in cap}
    assert images["train"] and images["validation"] and images["test"]
    assert not (images["train"] & images["test"]) and not (images["train"] & images["validation"])
    vqa = _rows(phantom_dir, "M3D_VQA_train.csv")
    assert list(vqa[0]) == ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C",
                            "Choice D", "Answer", "Answer Choice"]
    assert {r["Image Path"] for r in vqa} <= images["train"]
    labels = _rows(phantom_dir, "multi_abnormality_labels.csv")
    assert len(LABELS) >= 8 and list(labels[0])[1:] == list(LABELS)
    findings = read_findings(phantom_dir)
    assert any(f["storage"] == "dicom" for f in findings.values())
    assert os.path.isdir(os.path.join(phantom_dir, next(f["image"] for f in findings.values() if f["storage"] == "dicom")))
    assert len({f["orientation"] for f in findings.values()}) > 3 and len({f["plane"] for f in findings.values()}) == 3
    sp = np.array([f["spacing_mm"] for f in findings.values()])
    assert sp[:, :2].min() >= 0.5 - 1e-9 and sp[:, :2].max() <= 1.0 + 1e-9 and sp[:, 2].max() <= 5.0 + 1e-9


def test_writing_dicom_leaves_the_process_locale_as_it_was(tmp_path):
    """GDCM sets the C locale while it writes tags; left there, Python would open every file that
    names no encoding (Ray Data's log, for one) as ASCII and fail on the first non-ASCII message."""
    import locale

    from components.data.io import read_dicom_series
    from components.data.phantom import write_dicom_series

    before, encoding = locale.setlocale(locale.LC_ALL), locale.getpreferredencoding(False)
    write_dicom_series(np.zeros((8, 8, 3), np.float32), np.eye(4), str(tmp_path / "series"), uid_seed=1)
    assert locale.setlocale(locale.LC_ALL) == before and locale.getpreferredencoding(False) == encoding
    assert read_dicom_series(str(tmp_path / "series")).values().shape == (8, 8, 3)


def test_deterministic_from_the_seed_however_many_processes_write_it(tmp_path):
    from components.data.io import read_volume

    cfg = PhantomConfig(n_volumes=6, seed=9, scale=0.25, dicom_fraction=0.5)
    make_phantom_dataset(str(tmp_path / "a"), cfg)
    make_phantom_dataset(str(tmp_path / "b"), cfg, workers=2)

    def files(root):
        return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)

    names = files(tmp_path / "a")
    assert names == files(tmp_path / "b")
    series = sorted({os.path.dirname(n) for n in names if n.endswith(".dcm")})
    assert series and any(n.endswith(".nii.gz") for n in names)
    for name in names:  # tables, reports and NIfTI volumes byte for byte
        if not name.endswith(".dcm"):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # GDCM's writer adds a tag or not depending on what the process read before, so DICOM series are
    # compared as what a reader gets: voxels and geometry
    for folder in series:
        a, b = read_volume(str(tmp_path / "a" / folder)), read_volume(str(tmp_path / "b" / folder))
        np.testing.assert_array_equal(a.values(), b.values())
        np.testing.assert_array_equal(a.affine, b.affine)


def test_answers_are_balanced_so_a_blind_model_scores_at_chance(tmp_path):
    # text only (no volumes needed for the statistics): 400 cases
    from components.data.phantom import sample_case, split_of, vqa_rows

    cfg = PhantomConfig(n_volumes=400, seed=0)
    letters, answers = collections.Counter(), collections.defaultdict(collections.Counter)
    yn = collections.Counter()
    for i in range(cfg.n_volumes):
        case = sample_case(i, cfg, split_of(i, cfg))
        rows, yn_rows = vqa_rows(case, "x", "r", np.random.default_rng(i))
        for r in rows:
            letters[r["Answer Choice"]] += 1
            answers[r["Question Type"]][r["Answer"]] += 1
        yn.update(r["Answer"] for r in yn_rows)
    n = sum(letters.values())
    assert all(abs(c / n - 0.25) < 0.04 for c in letters.values()), letters
    for qtype, counts in answers.items():
        shares = np.array(list(counts.values())) / sum(counts.values())
        assert shares.max() - shares.min() < 0.12, (qtype, counts)
        # the best a text-only guess can do on this type (always the most common class) stays near chance
        assert shares.max() < 0.42, (qtype, counts)
    assert abs(yn["Yes"] / (yn["Yes"] + yn["No"]) - 0.5) < 0.05
    # question wording never depends on the answer
    by_question = collections.defaultdict(collections.Counter)
    for i in range(200):
        case = sample_case(i, cfg, "train")
        for r in vqa_rows(case, "x", "r", np.random.default_rng(i))[0]:
            by_question[r["Question"]][r["Answer"]] += 1
    for question, counts in by_question.items():
        assert max(counts.values()) / sum(counts.values()) < 0.5, (question, counts)


def test_reports_follow_the_findings(phantom_dir):
    findings = read_findings(phantom_dir)
    for vid, f in list(findings.items())[:10]:
        text = open(os.path.join(phantom_dir, "reports", f"{vid}.txt"), encoding="utf-8").read()
        assert f["plane"] in text.lower() and (f["phase"].split()[0] in text or "without intravenous" in text)
        for les in f["lesions"]:
            assert f"{les['size_mm']:.0f} mm" in text


def test_lesion_slices_mark_where_the_lesion_is_in_the_training_tensor():
    from dataclasses import asdict, replace

    from components.data.io import Volume
    from components.data.phantom import lesion_slices, render_case, sample_case
    from components.data.preprocess import preprocess_volume

    cfg = PhantomConfig(n_volumes=40, seed=3, scale=0.4)
    checked = set()
    for i in range(cfg.n_volumes):
        case = sample_case(i, cfg, "train")
        if len(case.lesions) != 1 or case.plane in checked:
            continue
        checked.add(case.plane)
        A = np.array(case.affine)
        with_lesion = preprocess_volume(Volume(render_case(case, cfg), A), "quickstart")[0]
        without = preprocess_volume(Volume(render_case(replace(case, lesions=[]), cfg), A), "quickstart")[0]
        touched = np.abs(with_lesion - without).max(axis=(1, 2)) > 0.02  # noise is identical in both renders
        mask = lesion_slices({**asdict(case), "lesions": [asdict(l) for l in case.lesions]}, "quickstart")
        assert mask is not None and mask.any() and mask.sum() < len(mask) / 2
        # linear interpolation and partial volume may blur the edge into the next slice
        near = mask | np.roll(mask, 1) | np.roll(mask, -1)
        assert (touched & ~near).sum() == 0, (case.plane, np.nonzero(touched)[0], np.nonzero(mask)[0])
        assert touched[mask].mean() >= 0.5
    assert checked == {"axial", "coronal", "sagittal"}
    assert lesion_slices({**asdict(sample_case(0, cfg, "train")), "lesions": []}, "quickstart") is None


def test_fixed_choice_order_keeps_the_letter_unguessable_without_the_image():
    from components.data.phantom import _CLASSES, QUESTION_TYPES, sample_case, split_of, vqa_rows

    cfg = PhantomConfig(n_volumes=400, seed=0, choice_order="fixed")
    by_type = collections.defaultdict(collections.Counter)
    for i in range(cfg.n_volumes):
        case = sample_case(i, cfg, split_of(i, cfg))
        for r in vqa_rows(case, "x", "r", np.random.default_rng(i), cfg.choice_order)[0]:
            choices = [r[f"Choice {x}"] for x in "ABCD"]
            qtype = QUESTION_TYPES[r["Question Type"]]
            order = _CLASSES[qtype] + ["oblique"]
            assert choices == sorted(choices, key=order.index)
            by_type[qtype][r["Answer Choice"]] += 1
    for qtype, letters in by_type.items():
        # the best blind guess (the commonest letter) is chance, or 1/3 for the plane's three real planes
        best = max(letters.values()) / sum(letters.values())
        assert best < (0.40 if qtype == "plane" else 0.33), (qtype, letters)
