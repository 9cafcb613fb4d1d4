"""A CT phantom dataset that runs anywhere and that a model can learn from.

Each case is an analytic body in RAS+ millimetres (body wall, lungs, heart, aorta, liver,
spleen, kidneys, spine), a contrast phase that changes vessel and organ enhancement,
0-2 lesions (type, physical size, organ, side, cranio-caudal part) and optional
cardiomegaly / pleural effusion, sampled on an acquisition grid with anisotropic spacing,
a random orientation code and one of three planes, plus noise. Volumes are written as
``.nii.gz`` (int16, sometimes with rescale slope/intercept) or as DICOM series.

Text comes from the same findings: a report with varied phrasing, M3D-VQA style rows
(open, 4-choice closed, yes/no for plane/phase/organ/abnormality/location) and a
CT-RATE style multi-label CSV. Answer classes are uniform per question type and answer
letters are shuffled, so a model that ignores the image scores at chance.

Everything is a pure function of ``(seed, case index)``.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import functools
import json
import locale
import multiprocessing
import os
from dataclasses import asdict, dataclass, field
from typing import Literal

import nibabel as nib
import numpy as np

PHASES = ("non-contrast", "arterial", "portal venous", "delayed")
PLANES = ("axial", "coronal", "sagittal")
LESION_TYPES = ("cyst", "solid mass", "calcification", "fat-containing lesion")
LESION_ORGANS = ("liver", "spleen", "kidney", "lung")
PARTS = ("upper", "middle", "lower")
SIDES = ("right", "left")
LABELS = ("Liver lesion", "Splenic lesion", "Renal lesion", "Lung nodule", "Cyst", "Solid mass",
          "Calcification", "Fat-containing lesion", "Cardiomegaly", "Pleural effusion")
NO_LESION = "no focal lesion"
QUESTION_TYPES = {1: "plane", 2: "phase", 3: "organ", 4: "abnormality", 5: "location"}

# HU per phase: (non-contrast, arterial, portal venous, delayed)
_BLOOD = (40, 320, 170, 110)
_LIVER = (60, 75, 115, 90)
_SPLEEN = (50, 110, 120, 95)
_KIDNEY = (35, 190, 170, 140)
_PELVIS = (30, 30, 60, 600)  # contrast excreted into the collecting system in the delayed phase
_LESION_HU = {"cyst": (5, 5, 5, 5), "solid mass": (45, 100, 85, 70), "calcification": (700,) * 4,
              "fat-containing lesion": (-90,) * 4}
_LESION_SIZE = {"cyst": (12, 40), "solid mass": (14, 40), "calcification": (8, 18), "fat-containing lesion": (12, 35)}


@dataclass
class PhantomConfig:
    """What the phantom generator makes."""

    n_volumes: int = 60
    """Number of cases."""
    seed: int = 0
    """Everything (anatomy, findings, text, splits) is a function of the seed and case index."""
    scale: float = 0.5
    """Anatomy scale: 1.0 is an adult torso (about 370 mm wide); small values keep CPU runs fast."""
    in_plane_mm: tuple[float, float] = (0.5, 1.0)
    """Range of in-plane voxel size."""
    slice_mm: tuple[float, float] = (1.0, 5.0)
    """Range of slice spacing."""
    shape: tuple[int, int, int] | None = None
    """Fixed matrix (in-plane, in-plane, slices) instead of one derived from the field of view."""
    spacing: tuple[float, float, float] | None = None
    """Fixed spacing (in-plane, in-plane, slice) in mm; used with ``shape``."""
    planes: tuple[str, ...] = PLANES
    """Acquisition planes to draw from."""
    dicom_fraction: float = 0.15
    """Share of cases written as DICOM series (one file per slice)."""
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15)
    """Train / validation / test shares, split by volume."""
    noise_hu: float = 12.0
    """Standard deviation of the added Gaussian noise."""
    choice_order: Literal["shuffled", "fixed"] = "shuffled"
    """Closed-ended choices in random order (as M3D-VQA), or in each question type's class order, so the
    answer letter follows from the answer alone: a model trained from scratch in minutes can learn that."""


@dataclass
class Lesion:
    type: str
    organ: str
    side: str
    part: str
    size_mm: float
    centre_mm: tuple[float, float, float]


@dataclass
class Case:
    id: str
    split: str
    phase: str
    plane: str
    orientation: str
    spacing_mm: tuple[float, float, float]
    shape: tuple[int, int, int]
    affine: list
    storage: str
    lesions: list[Lesion] = field(default_factory=list)
    cardiomegaly: bool = False
    effusion_side: str | None = None

    @property
    def main_lesion(self) -> Lesion | None:
        return max(self.lesions, key=lambda l: l.size_mm) if self.lesions else None

    def labels(self) -> dict[str, int]:
        types = {l.type for l in self.lesions}
        organs = {l.organ for l in self.lesions}
        return {
            "Liver lesion": int("liver" in organs), "Splenic lesion": int("spleen" in organs),
            "Renal lesion": int("kidney" in organs), "Lung nodule": int("lung" in organs),
            "Cyst": int("cyst" in types), "Solid mass": int("solid mass" in types),
            "Calcification": int("calcification" in types),
            "Fat-containing lesion": int("fat-containing lesion" in types),
            "Cardiomegaly": int(self.cardiomegaly), "Pleural effusion": int(self.effusion_side is not None),
        }


# --- anatomy --------------------------------------------------------------------------------

def _organs(s: float, cardiomegaly: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Organ ellipsoids (centre, semi-axes) in mm; +x = patient right, +y = anterior, +z = superior."""
    e = lambda c, r: (np.array(c, float) * s, np.array(r, float) * s)  # noqa: E731
    heart_r = np.array([55, 45, 45]) * (1.3 if cardiomegaly else 1.0)
    return {
        "lung_right": e((75, 0, 75), (68, 85, 95)),
        "lung_left": e((-75, 0, 75), (63, 85, 95)),
        "heart": e((-20, 40, 35), heart_r),
        "liver": e((70, 10, -45), (85, 75, 65)),
        "spleen": e((-85, -35, -30), (35, 42, 55)),
        "kidney_right": e((65, -55, -95), (30, 28, 50)),
        "kidney_left": e((-65, -55, -85), (30, 28, 50)),
    }


def _organ_key(organ: str, side: str) -> str:
    return f"{organ}_{side}" if organ in ("kidney", "lung") else organ


class _Painter:
    """Paints axis-aligned ellipsoids into a grid whose axes are a signed permutation of RAS."""

    def __init__(self, hu: np.ndarray, affine: np.ndarray):
        self.hu = hu
        self.world_axis = np.argmax(np.abs(affine[:3, :3]), axis=0)  # voxel axis -> world axis
        self.affine_diag = np.array([affine[self.world_axis[v], v] for v in range(3)])
        self.coords = [affine[self.world_axis[v], v] * np.arange(hu.shape[v]) + affine[self.world_axis[v], 3]
                       for v in range(3)]

    def ellipsoid(self, centre, radii, value, where=None, partial_volume=False):
        """Set voxels inside the ellipsoid to ``value``; with ``partial_volume`` a voxel gets the
        covered fraction of it (sub-sampled at <= 0.5 mm), as a CT voxel averages over its extent."""
        spacing = np.abs(self.affine_diag)
        subs = [max(1, int(np.ceil(spacing[v] / 0.5))) if partial_volume else 1 for v in range(3)]
        terms, slices = [], []
        for v in range(3):
            w = self.world_axis[v]
            r = radii[w]
            offsets = (np.arange(subs[v]) + 0.5) / subs[v] - 0.5
            coords = self.coords[v][:, None] + offsets[None, :] * spacing[v]
            t = np.zeros_like(coords) if not np.isfinite(r) else ((coords - centre[w]) / r) ** 2
            idx = np.nonzero((t <= 1.0).any(axis=1))[0]
            if idx.size == 0:
                return
            sl = slice(idx[0], idx[-1] + 1)
            slices.append(sl)
            terms.append(t[sl].astype(np.float32))
        block = self.hu[tuple(slices)]
        if subs == [1, 1, 1]:
            mask = (terms[0][:, None, None, 0] + terms[1][None, :, None, 0] + terms[2][None, None, :, 0]) <= 1.0
            if where is not None:
                mask &= where(block)
            block[mask] = value
            return
        frac = np.zeros(block.shape, np.float32)
        for a in range(subs[0]):
            for b in range(subs[1]):
                for c in range(subs[2]):
                    frac += (terms[0][:, None, None, a] + terms[1][None, :, None, b] + terms[2][None, None, :, c]) <= 1.0
        frac /= subs[0] * subs[1] * subs[2]
        block += frac * (value - block)


def _paint(case: Case, cfg: PhantomConfig, rng: np.random.Generator) -> np.ndarray:
    s = cfg.scale
    p = PHASES.index(case.phase)
    A = np.array(case.affine)
    hu = np.full(case.shape, -1000.0, dtype=np.float32)
    paint = _Painter(hu, A)
    inf = np.inf
    paint.ellipsoid((0, 0, 0), (170 * s, 118 * s, inf), -100)  # subcutaneous fat
    paint.ellipsoid((0, 0, 0), (155 * s, 103 * s, inf), 40)  # muscle / soft tissue
    organs = _organs(s, case.cardiomegaly)
    for side in SIDES:
        paint.ellipsoid(*organs[f"lung_{side}"], -850)
    if case.effusion_side:
        c, r = organs[f"lung_{case.effusion_side}"]
        # dependent fluid: posterior, basal part of the lung
        paint.ellipsoid(c + np.array([0, -0.55 * r[1], -0.5 * r[2]]), r * np.array([0.8, 0.45, 0.5]), 10,
                        where=lambda b: b < -500)
    paint.ellipsoid(*organs["heart"], _BLOOD[p])
    paint.ellipsoid((-20 * s, -45 * s, -35 * s), (12 * s, 12 * s, 95 * s), _BLOOD[p])  # aorta
    paint.ellipsoid(*organs["liver"], _LIVER[p])
    paint.ellipsoid(*organs["spleen"], _SPLEEN[p])
    for side in SIDES:
        c, r = organs[f"kidney_{side}"]
        paint.ellipsoid(c, r, _KIDNEY[p])
        paint.ellipsoid(c, r * 0.35, _PELVIS[p])
    paint.ellipsoid((0, -75 * s, 0), (22 * s, 20 * s, inf), 700)  # vertebral bodies
    paint.ellipsoid((0, -100 * s, 0), (8 * s, 8 * s, inf), 20)  # spinal canal
    for les in case.lesions:
        r = np.full(3, les.size_mm / 2)
        paint.ellipsoid(np.array(les.centre_mm), r, _LESION_HU[les.type][p], partial_volume=True)
    hu += rng.normal(0.0, cfg.noise_hu, size=hu.shape).astype(np.float32)
    return hu


# --- sampling a case -------------------------------------------------------------------------

def _grid(plane: str, cfg: PhantomConfig, rng: np.random.Generator):
    """(shape, affine, orientation code) of an acquisition in ``plane`` with random axis signs."""
    s = cfg.scale
    if cfg.spacing is not None:
        sp = np.array(cfg.spacing, float)
    else:
        ip = rng.uniform(*cfg.in_plane_mm)
        sp = np.array([ip, ip, rng.uniform(*cfg.slice_mm)])
    # world axes of the voxel axes (i, j in plane, k = slice axis)
    axes = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}[plane]
    extent = np.array([370.0, 260.0, 300.0]) * s  # field of view along x, y, z
    if cfg.shape is not None:
        shape = np.array(cfg.shape, int)
    else:
        shape = np.maximum(np.round(extent[list(axes)] / sp).astype(int), 8)
    signs = rng.choice([-1.0, 1.0], size=3)
    A = np.zeros((4, 4))
    A[3, 3] = 1.0
    for v, w in enumerate(axes):
        A[w, v] = signs[v] * sp[v]
    A[:3, 3] = -A[:3, :3] @ ((shape - 1) / 2.0)  # centred on the body
    code = "".join(nib.orientations.aff2axcodes(A))
    return tuple(int(x) for x in shape), A, code


def _lesion(rng: np.random.Generator, s: float, organs: dict, taken: list[Lesion]) -> Lesion:
    for _ in range(50):
        ltype = LESION_TYPES[rng.integers(len(LESION_TYPES))]
        organ = LESION_ORGANS[rng.integers(len(LESION_ORGANS))]
        side = {"liver": "right", "spleen": "left"}.get(organ) or SIDES[rng.integers(2)]
        part = PARTS[rng.integers(3)]
        c, r = organs[_organ_key(organ, side)]
        # lesions shrink less than the anatomy so they stay visible in small CPU phantoms
        size = float(np.round(rng.uniform(*_LESION_SIZE[ltype]) * np.sqrt(s), 1))
        size = min(size, float(r.min()) * 0.9)
        # the cranio-caudal third of the organ, away from its edges so the lesion stays inside
        zc = c[2] + {"upper": 0.45, "middle": 0.0, "lower": -0.45}[part] * r[2]
        xy = c[:2] + rng.uniform(-0.25, 0.25, size=2) * r[:2]
        centre = (float(xy[0]), float(xy[1]), float(zc))
        if all(np.linalg.norm(np.subtract(centre, t.centre_mm)) > (size + t.size_mm) / 2 + 3 for t in taken):
            return Lesion(ltype, organ, side, part, size, centre)
    raise RuntimeError("could not place a lesion")


def sample_case(index: int, cfg: PhantomConfig, split: str) -> Case:
    rng = np.random.default_rng([cfg.seed, index])
    plane = cfg.planes[rng.integers(len(cfg.planes))]
    shape, A, code = _grid(plane, cfg, rng)
    phase = PHASES[rng.integers(len(PHASES))]
    cardiomegaly = bool(rng.random() < 0.3)
    effusion = SIDES[rng.integers(2)] if rng.random() < 0.25 else None
    # P(no lesion) = 1/5 keeps the abnormality answer (4 types + none) uniform
    n_lesions = int(rng.choice([0, 1, 2], p=[0.2, 0.5, 0.3]))
    organs = _organs(cfg.scale, cardiomegaly)
    lesions: list[Lesion] = []
    for _ in range(n_lesions):
        lesions.append(_lesion(rng, cfg.scale, organs, lesions))
    storage = "dicom" if rng.random() < cfg.dicom_fraction else "nifti"
    sp = tuple(float(x) for x in np.linalg.norm(A[:3, :3], axis=0))
    return Case(id=f"ph_{index:05d}", split=split, phase=phase, plane=plane, orientation=code, spacing_mm=sp,
                shape=shape, affine=A.tolist(), storage=storage, lesions=lesions, cardiomegaly=cardiomegaly,
                effusion_side=effusion)


def split_of(index: int, cfg: PhantomConfig) -> str:
    order = np.random.default_rng([cfg.seed, 10**6]).permutation(cfg.n_volumes)
    rank = int(np.nonzero(order == index)[0][0])
    n_train = int(round(cfg.splits[0] * cfg.n_volumes))
    n_val = int(round(cfg.splits[1] * cfg.n_volumes))
    return "train" if rank < n_train else ("validation" if rank < n_train + n_val else "test")


def render_case(case: Case, cfg: PhantomConfig) -> np.ndarray:
    """The case's HU volume on its acquisition grid, indexed (x, y, z)."""
    index = int(case.id.split("_")[1])
    return _paint(case, cfg, np.random.default_rng([cfg.seed, index, 1]))


# --- writing volumes ---------------------------------------------------------------------------

def write_nifti(hu: np.ndarray, affine: np.ndarray, path: str, rescaled: bool) -> None:
    if rescaled:
        # nibabel picks slope/intercept to fit the float data into int16
        img = nib.Nifti1Image(hu, affine)
        img.set_data_dtype(np.int16)
    else:
        img = nib.Nifti1Image(np.clip(np.round(hu), -32768, 32767).astype(np.int16), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


@contextlib.contextmanager
def _locale_kept():
    """GDCM switches the whole process to the C locale when it writes tags and leaves it there; Python
    then opens every file without an explicit encoding (other libraries' log files) as ASCII."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def write_dicom_series(hu: np.ndarray, affine: np.ndarray, folder: str, uid_seed: int,
                       modality: str = "CT", skip_slices: tuple[int, ...] = ()) -> None:
    """One file per slice with CT rescale tags and full patient geometry.

    GDCM applies the rescale tags on write (stored = HU + 1024) and on read, so HU go in as they are.
    """
    import SimpleITK as sitk

    os.makedirs(folder, exist_ok=True)
    raw = np.clip(np.round(hu), -1024, 31743).astype(np.int16)
    image = sitk.GetImageFromArray(np.ascontiguousarray(raw.T))
    lps = np.diag([-1.0, -1.0, 1.0])
    sp = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing(tuple(sp))
    direction = lps @ affine[:3, :3] / sp
    image.SetDirection(tuple(direction.ravel()))
    image.SetOrigin(tuple(lps @ affine[:3, 3]))
    root = f"1.2.826.0.1.3680043.10.1138.{uid_seed}"
    iop = "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    with _locale_kept():
        for k in range(image.GetDepth()):
            if k in skip_slices:
                continue
            sl = image[:, :, k]
            pos = image.TransformIndexToPhysicalPoint((0, 0, k))
            tags = {
                "0008|0060": modality, "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0008|0018": f"{root}.2.{k + 1}", "0020|000d": f"{root}.0", "0020|000e": f"{root}.1",
                "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{v:.6f}" for v in pos), "0020|0037": iop,
                "0028|0030": f"{sp[1]:.6f}\\{sp[0]:.6f}", "0018|0050": f"{sp[2]:.6f}",
                "0028|1052": "-1024", "0028|1053": "1", "0028|1054": "HU",
                "0010|0010": "PHANTOM^CASE", "0010|0020": f"PH{uid_seed}", "0008|103e": "radray phantom",
                # GDCM stamps the wall clock where these are missing: the same case would differ run to run
                "0008|0020": "20240101", "0008|0030": "000000",
            }
            for key, value in tags.items():
                sl.SetMetaData(key, value)
            writer.SetFileName(os.path.join(folder, f"slice_{k + 1:04d}.dcm"))
            writer.Execute(sl)


# --- text --------------------------------------------------------------------------------------

_PHASE_TEXT = {"non-contrast": "without intravenous contrast", "arterial": "in the arterial phase",
               "portal venous": "in the portal venous phase", "delayed": "in the delayed (excretory) phase"}
_LESION_WORD = {"cyst": "simple cyst", "solid mass": "solid mass", "calcification": "calcified nodule",
                "fat-containing lesion": "fat-containing lesion"}
_ORGAN_TEXT = {"liver": "the liver", "spleen": "the spleen", "kidney": "the {side} kidney", "lung": "the {side} lung"}


def _where(les: Lesion) -> str:
    return f"the {les.part} part of " + _ORGAN_TEXT[les.organ].format(side=les.side)


def report_text(case: Case, rng: np.random.Generator) -> str:
    intro = rng.choice([
        "CT of the chest and abdomen {phase}, acquired in the {plane} plane.",
        "{Plane} CT images of the thorax and abdomen were obtained {phase}.",
        "Technique: {plane} acquisition {phase}.",
    ]).format(phase=_PHASE_TEXT[case.phase], plane=case.plane, Plane=case.plane.capitalize())
    findings = []
    for les in sorted(case.lesions, key=lambda l: -l.size_mm):
        findings.append(rng.choice([
            "A {size:.0f} mm {kind} is seen in {where}.",
            "There is a {size:.0f} mm {kind} in {where}.",
            "{where_cap} contains a {kind} measuring {size:.0f} mm.",
        ]).format(size=les.size_mm, kind=_LESION_WORD[les.type], where=_where(les),
                  where_cap=_where(les)[0].upper() + _where(les)[1:]))
    if not case.lesions:
        findings.append(rng.choice(["No focal lesion is identified.", "No focal abnormality is seen.",
                                    "There is no focal lesion."]))
    findings.append(rng.choice(["The heart is enlarged.", "Cardiomegaly is present."]) if case.cardiomegaly
                    else rng.choice(["Heart size is normal.", "The heart is not enlarged."]))
    if case.effusion_side:
        findings.append(rng.choice(["A {s} pleural effusion is present.", "There is a small {s} pleural effusion."])
                        .format(s=case.effusion_side))
    else:
        findings.append(rng.choice(["No pleural effusion.", "The pleural spaces are clear."]))
    main = case.main_lesion
    impression = (f"Impression: {_LESION_WORD[main.type]} in {_ORGAN_TEXT[main.organ].format(side=main.side)}."
                  if main else "Impression: no acute abnormality.")
    return " ".join([intro, *findings, impression])


_TEMPLATES = {
    "plane": ["In which plane is this CT scan acquired?", "Which imaging plane is shown in this image?",
              "What is the acquisition plane of this scan?"],
    "phase": ["In which contrast phase is this CT scan acquired?", "What is the contrast phase of this scan?",
              "Which phase of contrast enhancement is shown?"],
    "organ": ["Which organ contains the largest lesion?", "In which organ is the main lesion located?",
              "Which organ is affected by the largest lesion?"],
    "abnormality": ["What abnormality is seen in this scan?", "What type of lesion is present?",
                    "Which finding best describes the main abnormality?"],
    "location": ["Where is the largest lesion located within its organ?", "What is the location of the main lesion?",
                 "In which part of the organ is the largest lesion?"],
}
_YN = {
    "plane": "Is this CT scan acquired in the {} plane?",
    "phase": "Is this CT scan acquired in the {} phase?",
    "organ": "Is the largest lesion located in the {}?",
    "abnormality": "Does this scan show a {}?",
    "location": "Is the largest lesion located in the {} of its organ?",
}
_CLASSES = {
    "plane": list(PLANES), "phase": list(PHASES), "organ": list(LESION_ORGANS),
    "abnormality": list(LESION_TYPES) + [NO_LESION],
    "location": [f"{p} part, {s} side" for p in PARTS for s in SIDES],
}
_DISTRACTORS = {"plane": ["oblique"]}


def _answer(case: Case, qtype: str) -> str | None:
    main = case.main_lesion
    if qtype == "plane":
        return case.plane
    if qtype == "phase":
        return case.phase
    if qtype == "abnormality":
        return main.type if main else NO_LESION
    if main is None:
        return None
    return main.organ if qtype == "organ" else f"{main.part} part, {main.side} side"


VQA_COLUMNS = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
               "Answer", "Answer Choice"]


def vqa_rows(case: Case, image_path: str, report: str, rng: np.random.Generator, choice_order: str = "shuffled"):
    """M3D-VQA rows (one per question type) and yes/no rows for one case."""
    rows, yn_rows = [], []
    for code, qtype in QUESTION_TYPES.items():
        answer = _answer(case, qtype)
        if answer is None:
            continue
        others = [c for c in _CLASSES[qtype] + _DISTRACTORS.get(qtype, []) if c != answer]
        choices = [answer, *rng.choice(others, size=3, replace=False).tolist()]
        rng.shuffle(choices)
        if choice_order == "fixed":
            order = _CLASSES[qtype] + _DISTRACTORS.get(qtype, [])
            choices.sort(key=order.index)
        letter = "ABCD"[choices.index(answer)]
        rows.append(dict(zip(VQA_COLUMNS, [image_path, report, code, rng.choice(_TEMPLATES[qtype]),
                                           *choices, answer, letter])))
        asked = answer if rng.random() < 0.5 else rng.choice([c for c in _CLASSES[qtype] if c != answer])
        yn_rows.append(dict(zip(VQA_COLUMNS, [image_path, report, code, _YN[qtype].format(asked),
                                              "", "", "", "", "Yes" if asked == answer else "No", ""])))
    return rows, yn_rows


# --- the dataset ---------------------------------------------------------------------------------

def write_case(out_dir: str, cfg: PhantomConfig, i: int) -> dict:
    """Render and write case ``i`` (volume and report); returns its rows for the dataset's tables."""
    case = sample_case(i, cfg, split_of(i, cfg))
    rng = np.random.default_rng([cfg.seed, i, 2])
    hu = render_case(case, cfg)
    A = np.array(case.affine)
    if case.storage == "dicom":
        rel = f"volumes/{case.id}"
        write_dicom_series(hu, A, os.path.join(out_dir, rel), uid_seed=cfg.seed * 100000 + i)
    else:
        rel = f"volumes/{case.id}.nii.gz"
        write_nifti(hu, A, os.path.join(out_dir, rel), rescaled=bool(rng.random() < 0.5))
    report = report_text(case, rng)
    with open(os.path.join(out_dir, "reports", f"{case.id}.txt"), "w", encoding="utf-8") as f:
        f.write(report)
    rows, yn_rows = vqa_rows(case, rel, report, rng, cfg.choice_order)
    return {"split": case.split, "caption": {"image": rel, "text": f"reports/{case.id}.txt"}, "vqa": rows,
            "yn": yn_rows, "labels": {"VolumeName": rel, **case.labels()}, "finding": {**asdict(case), "image": rel}}


def _cases(out_dir: str, cfg: PhantomConfig, workers: int):
    """Each case's rows in index order, rendered by ``workers`` processes (every case is a function of
    the seed and its index, so the dataset does not depend on how many)."""
    write = functools.partial(write_case, out_dir, cfg)
    if workers <= 1:
        yield from map(write, range(cfg.n_volumes))
        return
    # spawn, not fork: the caller may hold threads (a Ray driver does), which fork would copy half-alive
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        yield from pool.map(write, range(cfg.n_volumes), chunksize=4)


def make_phantom_dataset(out_dir: str, cfg: PhantomConfig, progress=None, workers: int = 1) -> dict:
    """Write the dataset to a local folder (see the README section on the phantom layout), rendering
    cases in ``workers`` processes."""
    os.makedirs(os.path.join(out_dir, "volumes"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "reports"), exist_ok=True)
    cap = {"train": [], "validation": [], "test": []}
    vqa = {k: [] for k in cap}
    yn = {k: [] for k in cap}
    label_rows, findings = [], []
    for i, rec in enumerate(_cases(out_dir, cfg, workers)):
        cap[rec["split"]].append(rec["caption"])
        vqa[rec["split"]] += rec["vqa"]
        yn[rec["split"]] += rec["yn"]
        label_rows.append(rec["labels"])
        findings.append(rec["finding"])
        if progress:
            progress(i + 1, cfg.n_volumes)
    with open(os.path.join(out_dir, "M3D_Cap.json"), "w", encoding="utf-8") as f:
        json.dump(cap, f, indent=1)
    for split, name in (("train", "train"), ("validation", "val"), ("test", "test")):
        for table, prefix in ((vqa, "M3D_VQA"), (yn, "M3D_VQA_yn")):
            with open(os.path.join(out_dir, f"{prefix}_{name}.csv"), "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=VQA_COLUMNS)
                w.writeheader()
                w.writerows(table[split])
    with open(os.path.join(out_dir, "multi_abnormality_labels.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["VolumeName", *LABELS])
        w.writeheader()
        w.writerows(label_rows)
    with open(os.path.join(out_dir, "findings.jsonl"), "w", encoding="utf-8") as f:
        for rec in findings:
            f.write(json.dumps(rec) + "\n")
    summary = {"n_volumes": cfg.n_volumes, "splits": {k: len(v) for k, v in cap.items()},
               "dicom": sum(1 for r in findings if r["storage"] == "dicom"), "config": asdict(cfg)}
    with open(os.path.join(out_dir, "phantom.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary


def read_findings(root: str) -> dict[str, dict]:
    with open(os.path.join(root, "findings.jsonl"), encoding="utf-8") as f:
        return {r["id"]: r for r in map(json.loads, f)}


def lesion_slices(finding: dict, spec) -> np.ndarray | None:
    """Which slices (D axis) of the preprocessed tensor hold the case's largest lesion, as a bool
    array of length D; None when the case has no lesion. ``finding`` is a ``findings.jsonl`` row."""
    from components.data.preprocess import get_spec, grid_affine

    if not finding["lesions"]:
        return None
    main = max(finding["lesions"], key=lambda l: l["size_mm"])
    spec = get_spec(spec)
    out = grid_affine(np.array(finding["affine"]), finding["shape"], spec)
    centre_d = (np.linalg.inv(out) @ np.append(main["centre_mm"], 1.0))[2]
    radius_d = main["size_mm"] / 2 / np.linalg.norm(out[:3, 2])
    k = np.arange(spec.size[0])
    # a slice holds the lesion when its slab [k - 0.5, k + 0.5] overlaps the sphere's extent
    return (k + 0.5 > centre_d - radius_d) & (k - 0.5 < centre_d + radius_d)
