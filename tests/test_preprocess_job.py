"""The Ray Data preprocessing job on a local Ray: good volumes flow, bad ones are quarantined with reasons."""
import gzip
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from components.config import from_dict
from components.data.phantom import PhantomConfig, render_case, sample_case, write_dicom_series, write_nifti
from ray_jobs.preprocess import PreprocessConfig, run

NIB_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")
SPEC = {"size": [16, 32, 32]}


def _bad_dataset(root):
    """An M3D-layout dataset mixing good volumes with every kind of bad input."""
    vols = root / "vols"
    vols.mkdir(parents=True)
    cfg = PhantomConfig(n_volumes=3, seed=21, scale=0.3)
    entries = {}
    for i in range(3):
        case = sample_case(i, cfg, "train")
        hu = render_case(case, cfg)
        write_nifti(hu, np.array(case.affine), str(vols / f"good{i}.nii.gz"), rescaled=bool(i % 2))
        entries[f"good{i}.nii.gz"] = "good"
    write_dicom_series(hu, np.array(case.affine), str(vols / "good_dicom"), uid_seed=5)
    entries["good_dicom"] = "good"
    noise = np.random.default_rng(0).integers(-1000, 1000, (24, 24, 24)).astype(np.int16)
    raw = nib.Nifti1Image(noise, np.eye(4)).to_bytes()
    (vols / "truncated.nii.gz").write_bytes(gzip.compress(raw)[:4000])
    (vols / "zero.nii.gz").write_bytes(b"")
    (vols / "notimage.nii.gz").write_bytes(b"<html>404 not found</html>" * 30)
    nan = noise.astype(np.float32)
    nan[3, 4, 5] = np.nan
    nan[1, 1, 1] = np.inf
    nib.save(nib.Nifti1Image(nan, np.eye(4)), vols / "nan.nii.gz")
    nib.save(nib.Nifti1Image(noise[:, :, 0], np.eye(4)), vols / "flat.nii.gz")
    shutil.copy(os.path.join(NIB_DATA, "example4d.nii.gz"), vols / "fourd.nii.gz")
    zero = bytearray(nib.Nifti1Image(noise, np.eye(4)).to_bytes())
    zero[80:92] = np.array([1.0, 0.0, 1.0], "<f4").tobytes()
    zero[252:256] = b"\0\0\0\0"
    (vols / "zero_spacing.nii").write_bytes(bytes(zero))
    neg = bytearray(zero)
    neg[80:92] = np.array([1.0, -2.0, 1.0], "<f4").tobytes()
    (vols / "neg_spacing.nii").write_bytes(bytes(neg))
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape((30000, 30000, 30000))
    (vols / "huge.nii.gz").write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\1" * 64))
    case = sample_case(0, cfg, "train")
    hu = render_case(case, cfg)
    write_dicom_series(hu, np.array(case.affine), str(vols / "dicom_missing"), uid_seed=6, skip_slices=(3,))
    write_dicom_series(hu, np.array(case.affine), str(vols / "dicom_mixed"), uid_seed=7)
    write_dicom_series(hu + 5, np.array(case.affine), str(vols / "dicom_mixed"), uid_seed=8)  # same names: rename
    write_dicom_series(hu, np.array(case.affine), str(root / "tmp_series"), uid_seed=9)
    for f in os.listdir(root / "tmp_series"):
        os.rename(root / "tmp_series" / f, vols / "dicom_mixed" / f"x_{f}")
    expected_bad = {"truncated.nii.gz": "truncated", "zero.nii.gz": "empty", "notimage.nii.gz": "not_an_image",
                    "nan.nii.gz": "non_finite", "flat.nii.gz": "bad_ndim", "fourd.nii.gz": "bad_ndim",
                    "zero_spacing.nii": "bad_spacing", "neg_spacing.nii": "bad_spacing", "huge.nii.gz": "too_large",
                    "dicom_missing": "uneven_slices", "dicom_mixed": "mixed_series"}
    entries.update(expected_bad)
    reports = root / "reports"
    reports.mkdir()
    cap = {"train": [], "validation": [], "test": []}
    for i, name in enumerate(entries):
        rel_txt = f"reports/{i}.txt"
        if name == "good1.nii.gz":
            pass  # report file missing
        elif name == "good2.nii.gz":
            (root / rel_txt).write_text("   \n", encoding="utf-8")
        elif name == "good_dicom":
            (root / rel_txt).write_bytes("Lésion hépatique.".encode("latin-1"))
        else:
            (root / rel_txt).write_text(f"Report for {name}.", encoding="utf-8")
        cap["train"].append({"image": f"vols/{name}", "text": rel_txt})
    (root / "M3D_Cap.json").write_text(json.dumps(cap), encoding="utf-8")
    card = root / "card.yaml"
    card.write_text(f"name: bad\nadapter: m3d\nroot: {root}\nformat: mixed\nfiles:\n  cap_json: M3D_Cap.json\n"
                    "used_by: {tests: bad input}\n", encoding="utf-8")
    return str(card), expected_bad


def test_bad_inputs_are_quarantined_and_good_ones_flow(tmp_path, ray_local):
    card, expected_bad = _bad_dataset(tmp_path / "raw")
    out = tmp_path / "out"
    cfg = from_dict(PreprocessConfig, {"dataset": card, "output": str(out), "spec": "quickstart",
                                       "spec_overrides": SPEC, "max_volume_gb": 1.0})
    summary = run(cfg)
    v = summary["volumes"]
    assert v["in"] == 15 and v["in"] == v["out"] + v["quarantined"]
    assert v["out"] == 4 and v["quarantined"] == len(expected_bad)
    q = pq.read_table(out / "quarantine.parquet").to_pylist()
    by_source = {os.path.basename(r["source_uri"].rstrip("/")): r for r in q if r["stage"] != "sample"}
    for name, kind in expected_bad.items():
        assert by_source[name]["error_type"] == kind, (name, by_source[name])
        assert by_source[name]["message"]
    text = {r["error_type"] for r in q if r["stage"] == "text"}
    assert text == {"missing_text", "empty_text", "non_utf8"}
    s = summary["samples"]
    assert s["in"] == s["out"] + s["quarantined"] and s["out"] == 1
    assert os.path.exists(out / "quarantine.csv")

    import ray

    ds = ray.data.read_parquet(str(out / "volumes"))
    rows = ds.take_all()
    assert len(rows) == 4
    for r in rows:
        assert r["volume"].shape == (1, 16, 32, 32) and r["volume"].dtype == np.float32
        assert len(r["source_sha256"]) == 64 and r["spec"] == "quickstart"

    again = run(cfg)  # re-running skips what is done
    assert again["volumes"]["processed_this_run"] == 0
    assert again["volumes"]["out"] == 4 and again["volumes"]["quarantined"] == len(expected_bad)
    assert len(ray.data.read_parquet(str(out / "volumes")).take_all()) == 4


def test_phantom_preprocesses_to_the_spec(phantom_dir, tmp_path, ray_local):
    cfg = from_dict(PreprocessConfig, {"dataset": "phantom", "dataset_root": phantom_dir,
                                       "output": str(tmp_path / "pp"), "spec": "quickstart"})
    summary = run(cfg)
    assert summary["volumes"] == {"in": 24, "out": 24, "quarantined": 0, "processed_this_run": 24}
    import ray

    ds = ray.data.read_parquet(str(tmp_path / "pp" / "volumes"))
    batch = next(iter(ds.iter_batches(batch_size=24, batch_format="numpy")))
    assert batch["volume"].shape == (24, 1, 32, 64, 64) and batch["volume"].dtype == np.float32
    assert set(batch["plane"]) == {"axial", "coronal", "sagittal"}
    shard = next((tmp_path / "pp" / "volumes").glob("*.parquet"))
    meta = pq.ParquetFile(shard).metadata
    assert {meta.row_group(0).column(i).compression for i in range(meta.num_columns)} == {"LZ4"}  # the default
    samples = pq.read_table(tmp_path / "pp" / "samples.parquet")
    assert set(samples["volume_id"].to_pylist()) <= set(batch["id"])
    # resuming into these shards with another spec would mix shapes: refused before any work, naming why
    other = from_dict(PreprocessConfig, {"dataset": "phantom", "dataset_root": phantom_dir, "output": str(tmp_path / "pp"),
                                         "spec": "quickstart", "spec_overrides": {"size": [16, 32, 32]}})
    with pytest.raises(ValueError, match=r"another spec \(size: \[\[32, 64, 64\]\] then, \[\[16, 32, 32\]\] now\)"):
        run(other)
    # also when the first run stopped before writing its summary
    os.remove(tmp_path / "pp" / "summary.json")
    with pytest.raises(ValueError, match=r"another spec \(size:"):
        run(other)
