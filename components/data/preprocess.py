"""Preprocessing specs: orient, resample, window, crop/pad or resize -> channel-first ``(1, D, H, W)``.

All spatial tuples are in output array order ``(D, H, W)``: D is the slice axis.

Orientation modes (every spec states which it uses, because it decides what the
``plane`` questions can see):

- ``RAS``: reoriented to a fixed anatomical frame (W->Right, H->Anterior, D->Superior,
  nibabel's RAS+ convention, as MONAI's ``Orientation("RAS")``). The axes no longer tell
  the acquisition plane, though the blur of thick slices along the old slice axis can:
  a model reads the plane off it well above chance (docs/learning_proof.md).
- ``plane``: the acquisition plane's standard display (axial: W->Left, H->Posterior,
  D->Superior; coronal: W->Left, H->Inferior, D->Anterior; sagittal: W->Posterior,
  H->Inferior, D->Left), the plane taken from the slice (third voxel) axis. Flips and
  axis codes are normalised, the plane stays visible — how Radiopaedia-derived data such
  as M3D looks.
- ``none``: the stored voxel axes as they are (x->W, y->H, z->D), as M3D's own
  preprocessing does (it never reorients).

Orientation, resampling and cropping are folded into one linear resampling onto the
output grid (SimpleITK), so the cost scales with the output, not the input: a
512x512x200 CT becomes 112x224x224 without materialising the intermediate resampled
volume. :func:`monai_reference` is the same spec as the usual MONAI transform chain,
used to cross-check and as the benchmark baseline.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from components.data.io import Volume

AXIAL, CORONAL, SAGITTAL = "axial", "coronal", "sagittal"

# Output axis directions (columns W, H, D) in RAS+ world coordinates.
_FRAMES = {
    "RAS": np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64).T,
    AXIAL: np.array([[-1, 0, 0], [0, -1, 0], [0, 0, 1]], dtype=np.float64).T,
    CORONAL: np.array([[-1, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=np.float64).T,
    SAGITTAL: np.array([[0, -1, 0], [0, 0, -1], [-1, 0, 0]], dtype=np.float64).T,
}


@dataclass(frozen=True)
class PreprocessSpec:
    """How a raw volume becomes a fixed-shape training tensor."""

    name: str
    """Spec name recorded with every output volume."""
    size: tuple[int, int, int]
    """Output shape (D, H, W)."""
    spacing_mm: tuple[float, float, float] | None = None
    """Target voxel size (D, H, W) in mm for ``fit: crop_pad``; None keeps the input spacing."""
    orientation: Literal["RAS", "plane", "none"] = "RAS"
    """See the module docstring: ``RAS`` takes the acquisition plane out of the axes, ``plane`` and
    ``none`` keep it."""
    fit: Literal["crop_pad", "resize"] = "crop_pad"
    """``crop_pad``: centre crop/pad at the target spacing; ``resize``: the whole field of view scaled to ``size``."""
    hu_window: tuple[float, float] | None = (-1000.0, 1000.0)
    """HU range kept (clipped) before scaling; None uses the volume's own min/max."""
    output_range: tuple[float, float] = (0.0, 1.0)
    """Values the window (or min/max) maps to."""
    pad_hu: float = -1000.0
    """HU used outside the field of view (air)."""
    dtype: Literal["float32", "float16"] = "float32"
    """Stored dtype of the output tensor."""

    def __post_init__(self):
        if len(self.size) != 3 or min(self.size) < 1:
            raise ValueError(f"size must be three positive ints (D, H, W), got {self.size}")
        if self.spacing_mm is not None and (len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0):
            raise ValueError(f"spacing_mm must be three positive numbers, got {self.spacing_mm}")
        if self.hu_window is not None and self.hu_window[1] <= self.hu_window[0]:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {self.hu_window}")

    @property
    def reorients(self) -> bool:
        """True when the acquisition plane is no longer visible in the output."""
        return self.orientation == "RAS"


SPECS: dict[str, PreprocessSpec] = {
    # E3D-GPT: 1.5x1.5x3 mm, HU [-1000, 1000], 224x224x112 (H x W x D).
    "e3d": PreprocessSpec("e3d", size=(112, 224, 224), spacing_mm=(3.0, 1.5, 1.5), orientation="RAS"),
    # M3D / Med-2E3: 32x256x256, min-max normalised, never reoriented.
    "m3d": PreprocessSpec("m3d", size=(32, 256, 256), orientation="none", fit="resize", hu_window=None),
    # Med3DVLM: 128x256x256 on M3D data, same conventions.
    "med3dvlm": PreprocessSpec("med3dvlm", size=(128, 256, 256), orientation="none", fit="resize", hu_window=None),
    # CPU quickstart: small, plane kept visible so every question type stays answerable. A soft-tissue
    # window (W400 L40): under [-1000, 1000] the contrast phases differ by 1-2 % of the range, too
    # little for a model trained from scratch in minutes to pick up.
    "quickstart": PreprocessSpec("quickstart", size=(32, 64, 64), orientation="plane", fit="resize",
                                 hu_window=(-160.0, 240.0)),
}


def get_spec(name_or_spec: str | PreprocessSpec | dict) -> PreprocessSpec:
    """A named spec, or a mapping of fields (``base: <name>`` starts from a named spec), validated."""
    from components.config import from_dict, to_dict

    if isinstance(name_or_spec, PreprocessSpec):
        return name_or_spec
    if isinstance(name_or_spec, dict):
        d = dict(name_or_spec)
        base = d.pop("base", None)
        fields = to_dict(get_spec(base)) if base else {}
        fields.update(d)
        return from_dict(PreprocessSpec, fields)
    if name_or_spec not in SPECS:
        raise KeyError(f"unknown preprocessing spec {name_or_spec!r}; known: {', '.join(SPECS)}")
    return SPECS[name_or_spec]


def acquisition_plane(affine: np.ndarray) -> str:
    """The plane a series was acquired in, from the world direction of its slice (z) axis."""
    normal = np.abs(affine[:3, 2])
    return (SAGITTAL, CORONAL, AXIAL)[int(np.argmax(normal))]


def output_grid(vol: Volume, spec: PreprocessSpec) -> np.ndarray:
    """The 4x4 affine (output voxel (w, h, d) -> RAS mm) of the spec's output grid for ``vol``."""
    return grid_affine(vol.affine, vol.array.shape, spec)


def grid_affine(affine: np.ndarray, shape, spec: PreprocessSpec) -> np.ndarray:
    """:func:`output_grid` from a source affine and voxel shape alone (e.g. to map findings in mm
    onto the training tensor without reading the volume)."""
    A = np.asarray(affine, dtype=np.float64)
    in_shape = np.array(shape, dtype=np.float64)
    in_spacing = np.linalg.norm(A[:3, :3], axis=0)
    if spec.orientation == "RAS":
        frame = _FRAMES["RAS"]
    elif spec.orientation == "plane":
        frame = _FRAMES[acquisition_plane(A)]
    else:
        frame = A[:3, :3] / in_spacing
    # Which input axis runs along each output axis (for spacing and field-of-view extents).
    match = np.argmax(np.abs(frame.T @ (A[:3, :3] / in_spacing)), axis=1)
    size_whd = np.array(spec.size[::-1], dtype=np.float64)
    if spec.fit == "resize":
        spacing = in_shape[match] * in_spacing[match] / size_whd
    elif spec.spacing_mm is not None:
        spacing = np.array(spec.spacing_mm[::-1], dtype=np.float64)
    else:
        spacing = in_spacing[match]
    centre = A @ np.append((in_shape - 1) / 2, 1.0)
    out = np.eye(4)
    out[:3, :3] = frame * spacing
    out[:3, 3] = centre[:3] - out[:3, :3] @ ((size_whd - 1) / 2)
    return out


def _needed_region(vol: Volume, out_affine: np.ndarray, size_whd) -> tuple[slice, slice, slice]:
    """Input voxels the output grid can touch (+1 for interpolation): only these are handed over."""
    corners = np.array([[x, y, z, 1.0] for x in (0, size_whd[0] - 1) for y in (0, size_whd[1] - 1)
                        for z in (0, size_whd[2] - 1)]).T
    ijk = (np.linalg.inv(vol.affine) @ out_affine @ corners)[:3]
    lo = np.maximum(np.floor(ijk.min(axis=1)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(ijk.max(axis=1)).astype(int) + 2, vol.array.shape)
    if np.any(hi <= lo):  # output entirely outside the field of view: keep a sliver, it resamples to padding
        lo, hi = np.zeros(3, int), np.minimum(np.ones(3, int) * 2, vol.array.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def resample_to_spec(vol: Volume, spec: PreprocessSpec) -> np.ndarray:
    """Values (HU or normalised) on the spec's output grid, as float32 ``(D, H, W)``."""
    import SimpleITK as sitk

    out_affine = output_grid(vol, spec)
    size_whd = [int(s) for s in spec.size[::-1]]
    region = _needed_region(vol, out_affine, size_whd)
    arr = vol.array[region]
    if arr.dtype == np.bool_ or arr.dtype.itemsize > 4 or arr.dtype == np.uint32:
        arr = arr.astype(np.float32)
    # nibabel's (x, y, z) Fortran-ordered data is SimpleITK's C-ordered (z, y, x). SimpleITK copies
    # the needed region straight from the strided view into its image: no intermediate numpy copy.
    image = sitk.GetImageFromArray(arr.T)
    origin = vol.affine @ np.array([region[0].start, region[1].start, region[2].start, 1.0])
    lps = np.diag([-1.0, -1.0, 1.0])
    in_sp = np.linalg.norm(vol.affine[:3, :3], axis=0)
    image.SetSpacing(tuple(in_sp))
    image.SetDirection(tuple((lps @ vol.affine[:3, :3] / in_sp).ravel()))
    image.SetOrigin(tuple(lps @ origin[:3]))
    out_sp = np.linalg.norm(out_affine[:3, :3], axis=0)
    pad = (spec.pad_hu - vol.intercept) / vol.slope if vol.intensity == "hu" else 0.0
    resampled = sitk.Resample(
        image, size_whd, sitk.Transform(), sitk.sitkLinear,
        tuple(lps @ out_affine[:3, 3]), tuple(out_sp), tuple((lps @ out_affine[:3, :3] / out_sp).ravel()),
        float(pad), sitk.sitkFloat32,
    )
    out = sitk.GetArrayFromImage(resampled)  # (D, H, W)
    if vol.intensity == "hu" and (vol.slope != 1.0 or vol.intercept != 0.0):
        out *= np.float32(vol.slope)
        out += np.float32(vol.intercept)
    return out


def scale_intensity(values: np.ndarray, spec: PreprocessSpec, intensity: str = "hu") -> np.ndarray:
    lo_out, hi_out = spec.output_range
    if spec.hu_window is not None and intensity == "hu":
        lo, hi = spec.hu_window
    else:
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            hi = lo + 1.0
    np.clip(values, lo, hi, out=values)
    values -= np.float32(lo)
    values *= np.float32((hi_out - lo_out) / (hi - lo))
    values += np.float32(lo_out)
    return values


def preprocess_volume(vol: Volume, spec: PreprocessSpec | str) -> np.ndarray:
    """``vol`` -> channel-first ``(1, D, H, W)`` array of the spec's dtype."""
    spec = get_spec(spec)
    if vol.intensity == "normalized" and spec.fit == "crop_pad" and spec.spacing_mm is not None:
        # Geometry-free arrays (M3D .npy) cannot be resampled to millimetres; scale them instead.
        spec = replace(spec, fit="resize", orientation="none")
    out = resample_to_spec(vol, spec)
    out = scale_intensity(out, spec, vol.intensity)
    return out[None].astype(spec.dtype, copy=False)


class ResampleToSpec:
    """MONAI-style transform: ``Volume`` -> ``(1, D, H, W)`` numpy array for ``spec``."""

    def __init__(self, spec: PreprocessSpec | str):
        self.spec = get_spec(spec)

    def __call__(self, vol: Volume) -> np.ndarray:
        return preprocess_volume(vol, self.spec)


def monai_reference(spec: PreprocessSpec | str, pixdim_order: str = "whd"):
    """The spec written as the usual MONAI chain (Orientation, Spacing, ScaleIntensityRange,
    ResizeWithPadOrCrop), applied to a file path; returns ``(1, D, H, W)``.

    Only for RAS + crop_pad specs: this is the peers' single-process pipeline, kept as the
    baseline the benchmark compares against and as an independent cross-check.
    """
    import monai.transforms as mt

    spec = get_spec(spec)
    if spec.orientation != "RAS" or spec.fit != "crop_pad" or spec.spacing_mm is None:
        raise ValueError("the MONAI reference chain covers RAS crop_pad specs only")
    lo, hi = spec.hu_window or (-1000.0, 1000.0)
    chain = mt.Compose([
        mt.LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader"),
        mt.Orientation(axcodes="RAS"),
        mt.Spacing(pixdim=spec.spacing_mm[::-1], mode="bilinear"),
        mt.ScaleIntensityRange(a_min=lo, a_max=hi, b_min=spec.output_range[0], b_max=spec.output_range[1], clip=True),
        mt.ResizeWithPadOrCrop(spatial_size=spec.size[::-1], mode="constant",
                               constant_values=spec.output_range[0]),
    ])

    def run(path: str) -> np.ndarray:
        out = np.asarray(chain(path))  # (1, W, H, D)
        return np.ascontiguousarray(out.transpose(0, 3, 2, 1)).astype(spec.dtype)

    return run
