"""Volume IO on real files: NIfTI (nibabel's own test data and written phantoms), DICOM series, .npy."""
import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from components.data.io import VolumeError, read_volume
from components.data.phantom import PhantomConfig, render_case, sample_case, write_dicom_series, write_nifti

NIB_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")


def _case(plane="axial", seed=5):
    cfg = PhantomConfig(n_volumes=1, seed=seed, scale=0.3, planes=(plane,), slice_mm=(2.0, 3.0))
    case = sample_case(0, cfg, "train")
    return case, render_case(case, cfg)


def test_real_nifti_geometry():
    vol = read_volume(os.path.join(NIB_DATA, "anatomical.nii"))
    img = nib.load(os.path.join(NIB_DATA, "anatomical.nii"))
    assert vol.array.shape == img.shape
    np.testing.assert_allclose(vol.affine, img.affine)
    assert vol.orientation == "".join(nib.aff2axcodes(img.affine))
    np.testing.assert_allclose(vol.values(), img.get_fdata().astype(np.float32), rtol=1e-5)


def test_real_4d_nifti_is_refused():
    with pytest.raises(VolumeError) as e:
        read_volume(os.path.join(NIB_DATA, "example4d.nii.gz"))
    assert e.value.kind == "bad_ndim" and "4D" in str(e.value)


@pytest.mark.parametrize("rescaled", [False, True])
def test_nifti_int16_with_rescale_round_trips(tmp_path, rescaled):
    case, hu = _case()
    p = str(tmp_path / "v.nii.gz")
    write_nifti(hu, np.array(case.affine), p, rescaled=rescaled)
    vol = read_volume(p)
    assert vol.array.dtype == np.int16
    assert (vol.slope != 1.0 or vol.intercept != 0.0) == rescaled
    tol = 0.5 if not rescaled else 0.5 * vol.slope + 1e-3
    assert np.abs(vol.values() - hu).max() <= tol + 1e-4
    assert vol.orientation == case.orientation
    np.testing.assert_allclose(vol.spacing, case.spacing_mm, rtol=1e-5)
    assert len(vol.meta["sha256"]) == 64


def test_gzip_written_in_several_members_reads_whole(tmp_path):
    # bgzip and some archivers write a .nii.gz as a chain of gzip members; nibabel reads them all
    case, hu = _case()
    p = str(tmp_path / "v.nii")
    write_nifti(hu, np.array(case.affine), p, rescaled=True)
    raw = open(p, "rb").read()
    cut = len(raw) // 3
    with open(p + ".gz", "wb") as f:
        f.write(gzip.compress(raw[:cut]) + gzip.compress(raw[cut:2 * cut]) + gzip.compress(raw[2 * cut:]))
    vol = read_volume(p + ".gz")
    np.testing.assert_array_equal(vol.array, nib.load(p + ".gz").dataobj.get_unscaled())


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_dicom_series_matches_the_nifti_it_came_from(tmp_path, plane):
    case, hu = _case(plane)
    A = np.array(case.affine)
    write_dicom_series(hu, A, str(tmp_path / "series"), uid_seed=7)
    (tmp_path / "series" / "README.txt").write_text("not a DICOM file", encoding="utf-8")  # non-image objects are ignored
    vol = read_volume(str(tmp_path / "series"))
    # GDCM may stack the slices in the other direction: compare in one canonical frame.
    got_arr, got_aff = _canonical(vol.values(), vol.affine)
    want_arr, want_aff = _canonical(np.clip(np.round(hu), -1024, 31743), A)
    np.testing.assert_allclose(got_aff, want_aff, atol=1e-4)
    np.testing.assert_allclose(got_arr, want_arr, atol=1e-3)


def _canonical(arr, affine):
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(arr, np.float32), affine))
    return np.asarray(img.dataobj), img.affine


def test_npy_in_m3d_layout(tmp_path):
    arr = np.random.default_rng(0).random((1, 8, 16, 16)).astype(np.float32)
    np.save(tmp_path / "0.npy", arr)
    vol = read_volume(str(tmp_path / "0.npy"))
    assert vol.intensity == "normalized" and vol.array.shape == (16, 16, 8)
    np.testing.assert_array_equal(vol.array.T, arr[0])


def _nifti_bytes(data, affine=np.eye(4), zooms=None):
    raw = bytearray(nib.Nifti1Image(data, affine).to_bytes())
    if zooms is not None:  # patch the header as a broken writer would: pixdim[1:4], no qform/sform
        raw[80:92] = np.asarray(zooms, "<f4").tobytes()
        raw[252:256] = np.zeros(2, "<i2").tobytes()
    return bytes(raw)


_NOISE = np.random.default_rng(0).integers(-1000, 1000, (20, 20, 20)).astype(np.int16)


@pytest.mark.parametrize("name, payload, kind", [
    ("zero.nii.gz", b"", "empty"),
    ("text.nii.gz", gzip.compress(b"this is a radiology report, not an image" * 20), "not_an_image"),
    ("text.nii", b"GIF89a" + b"\0" * 400, "not_an_image"),
    ("trunc.nii.gz", gzip.compress(_nifti_bytes(_NOISE))[:3000], "truncated"),
    ("short.nii", _nifti_bytes(np.zeros((20, 20, 20), np.int16))[:2000], "truncated"),
    ("nan.nii", _nifti_bytes(np.where(np.eye(8)[:, :, None] > 0, np.nan, 1.0).repeat(8, 2).astype(np.float32)),
     "non_finite"),
    ("flat.nii", _nifti_bytes(np.zeros((32, 32), np.int16)), "bad_ndim"),
    ("zero_spacing.nii", _nifti_bytes(np.zeros((8, 8, 8), np.int16), zooms=(1.0, 0.0, 1.0)), "bad_spacing"),
    ("neg_spacing.nii", _nifti_bytes(np.zeros((8, 8, 8), np.int16), zooms=(1.0, -1.0, 1.0)), "bad_spacing"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 40 else "")
def test_bad_files_are_refused_with_a_reason(tmp_path, name, payload, kind):
    p = tmp_path / name
    p.write_bytes(payload)
    with pytest.raises(VolumeError) as e:
        read_volume(str(p))
    assert e.value.kind == kind, str(e.value)


def test_enormous_header_is_refused_before_allocating(tmp_path):
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape((30000, 30000, 30000))
    raw = hdr.binaryblock + b"\0" * 4 + b"\1\2" * 100
    (tmp_path / "huge.nii.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(VolumeError) as e:
        read_volume(str(tmp_path / "huge.nii.gz"))
    assert e.value.kind == "too_large" and "30000" in str(e.value)


def test_dicom_missing_slice_uneven_spacing_and_mixed_series(tmp_path):
    import pydicom

    case, hu = _case()
    A = np.array(case.affine)
    write_dicom_series(hu, A, str(tmp_path / "missing"), uid_seed=1, skip_slices=(4,))
    with pytest.raises(VolumeError) as e:
        read_volume(str(tmp_path / "missing"))
    assert e.value.kind == "uneven_slices" and "missing slice" in str(e.value)

    write_dicom_series(hu, A, str(tmp_path / "uneven"), uid_seed=2)
    for f in sorted(os.listdir(tmp_path / "uneven"))[5:]:
        ds = pydicom.dcmread(tmp_path / "uneven" / f)
        ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.4 * case.spacing_mm[2]
        ds.save_as(tmp_path / "uneven" / f)
    with pytest.raises(VolumeError) as e:
        read_volume(str(tmp_path / "uneven"))
    assert e.value.kind == "uneven_slices"

    write_dicom_series(hu, A, str(tmp_path / "mixed"), uid_seed=3)
    write_dicom_series(hu[::-1], A, str(tmp_path / "mixed2"), uid_seed=4)
    for f in os.listdir(tmp_path / "mixed2"):
        os.rename(tmp_path / "mixed2" / f, tmp_path / "mixed" / f"b_{f}")
    with pytest.raises(VolumeError) as e:
        read_volume(str(tmp_path / "mixed"))
    assert e.value.kind == "mixed_series" and "2 image series" in str(e.value)
