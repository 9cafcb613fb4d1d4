"""Preprocessing specs: shapes, physical sizes, orientation invariance, agreement with MONAI."""
import dataclasses

import nibabel as nib
import numpy as np
import pytest

from components.data.io import Volume, read_volume
from components.data.phantom import Case, Lesion, PhantomConfig, render_case, sample_case, write_nifti
from components.data.preprocess import SPECS, get_spec, monai_reference, output_grid, preprocess_volume

SMALL_E3D = get_spec({"base": "e3d", "size": [48, 96, 96]})  # e3d geometry (1.5x1.5x3 mm), smaller field


@pytest.mark.parametrize("name", list(SPECS))
def test_every_named_spec_gives_its_shape_and_dtype(name):
    cfg = PhantomConfig(n_volumes=1, seed=1, scale=0.3)
    case = sample_case(0, cfg, "train")
    out = preprocess_volume(Volume(render_case(case, cfg), np.array(case.affine)), name)
    spec = SPECS[name]
    assert out.shape == (1, *spec.size) and out.dtype == np.dtype(spec.dtype)
    lo, hi = spec.output_range
    assert out.min() >= lo - 1e-6 and out.max() <= hi + 1e-6


def test_specs_say_whether_they_reorient():
    assert SPECS["e3d"].reorients and not SPECS["m3d"].reorients and not SPECS["quickstart"].reorients
    assert SPECS["e3d"].spacing_mm == (3.0, 1.5, 1.5) and SPECS["e3d"].size == (112, 224, 224)
    assert SPECS["m3d"].size == (32, 256, 256) and SPECS["med3dvlm"].size == (128, 256, 256)


def _lesion_case(plane: str, spacing: tuple, seed: int) -> tuple[Case, PhantomConfig]:
    cfg = PhantomConfig(n_volumes=1, seed=seed, scale=0.5, planes=(plane,), shape=None,
                        in_plane_mm=(spacing[0], spacing[0]), slice_mm=(spacing[2], spacing[2]), noise_hu=5.0)
    case = sample_case(0, cfg, "train")
    # one 20 mm calcification in the middle of the liver (700 HU against ~60-115 HU liver)
    liver_centre = (35.0, 5.0, -22.5)
    case = dataclasses.replace(case, lesions=[Lesion("calcification", "liver", "right", "middle", 20.0, liver_centre)])
    return case, cfg


@pytest.mark.parametrize("plane, spacing", [
    ("axial", (0.5, 0.5, 1.0)), ("axial", (0.9, 0.9, 5.0)), ("coronal", (0.7, 0.7, 2.5)), ("sagittal", (0.6, 0.6, 3.0)),
])
def test_a_20mm_lesion_measures_20mm_after_resampling(plane, spacing):
    case, cfg = _lesion_case(plane, spacing, seed=hash((plane, spacing)) % 1000)
    vol = Volume(render_case(case, cfg), np.array(case.affine))
    out = preprocess_volume(vol, SMALL_E3D)[0]
    # half maximum between the lesion (700 HU) and the liver around it, in the window's [0, 1] scale
    liver = {"non-contrast": 60, "arterial": 75, "portal venous": 115, "delayed": 90}[case.phase]
    mask = out > ((700 + liver) / 2 + 1000) / 2000
    from scipy import ndimage

    labels, _ = ndimage.label(mask)
    w, h, d = np.round(np.linalg.inv(output_grid(vol, SMALL_E3D)) @ (*case.lesions[0].centre_mm, 1.0))[:3].astype(int)
    assert labels[d, h, w] > 0
    lesion = labels == labels[d, h, w]
    for axis, sp in enumerate(SMALL_E3D.spacing_mm):
        extent = np.any(lesion, axis=tuple(a for a in range(3) if a != axis)).sum() * sp
        assert abs(extent - 20.0) <= sp + 1e-6, (plane, spacing, axis, extent)


def test_the_same_phantom_in_two_orientations_preprocesses_to_the_same_array(tmp_path):
    cfg = PhantomConfig(n_volumes=1, seed=11, scale=0.4, planes=("axial",))
    case = sample_case(0, cfg, "train")
    hu = render_case(case, cfg)
    A = np.array(case.affine)
    # the same voxels stored with axes permuted and flipped (e.g. LPS vs. RAS vs. SLP storage)
    ornt = np.array([[2, -1], [0, 1], [1, -1]])
    img = nib.Nifti1Image(hu, A)
    other = img.as_reoriented(ornt)
    assert "".join(nib.aff2axcodes(other.affine)) != case.orientation
    write_nifti(hu, A, str(tmp_path / "a.nii.gz"), rescaled=False)
    write_nifti(np.asarray(other.dataobj), other.affine, str(tmp_path / "b.nii.gz"), rescaled=False)
    a = preprocess_volume(read_volume(str(tmp_path / "a.nii.gz")), SMALL_E3D)
    b = preprocess_volume(read_volume(str(tmp_path / "b.nii.gz")), SMALL_E3D)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_plane_mode_keeps_the_acquisition_plane_and_ras_hides_it():
    cfg = PhantomConfig(n_volumes=1, seed=2, scale=0.4, noise_hu=0.0)
    hu_by_plane = {}
    for plane in ("axial", "coronal"):
        c = dataclasses.replace(cfg, planes=(plane,), in_plane_mm=(0.8, 0.8), slice_mm=(0.8, 0.8))
        case = dataclasses.replace(sample_case(0, c, "train"), phase="arterial", lesions=[], cardiomegaly=False,
                                   effusion_side=None)
        hu_by_plane[plane] = Volume(render_case(case, c), np.array(case.affine))
    cube = {"size": [48, 48, 48], "spacing_mm": [4.0, 4.0, 4.0]}
    ras = [preprocess_volume(v, get_spec({"base": "e3d", **cube})) for v in hu_by_plane.values()]
    plane = [preprocess_volume(v, get_spec({"base": "e3d", **cube, "orientation": "plane"}))
             for v in hu_by_plane.values()]
    assert np.abs(ras[0] - ras[1]).mean() < 0.01  # same patient, same array: plane hidden
    assert np.abs(plane[0] - plane[1]).mean() > 0.05  # display orientation differs: plane visible


def test_agrees_with_the_monai_chain(tmp_path):
    cfg = PhantomConfig(n_volumes=1, seed=4, scale=0.5, planes=("axial",))
    case = sample_case(0, cfg, "train")
    p = str(tmp_path / "v.nii.gz")
    write_nifti(render_case(case, cfg), np.array(case.affine), p, rescaled=True)
    ours = preprocess_volume(read_volume(p), SMALL_E3D)
    ref = monai_reference(SMALL_E3D)(p)
    assert ours.shape == ref.shape
    # MONAI's crop picks whole voxels, ours centres exactly: allow sub-voxel differences at edges
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.97
    assert np.abs(ours - ref).mean() < 0.03
