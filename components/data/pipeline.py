"""One raw volume -> one training record or one quarantine record. Ray-free; the job maps it."""
from __future__ import annotations

import traceback

import numpy as np

from components.data.adapters.base import quarantine
from components.data.io import MAX_VOXEL_BYTES, Volume, VolumeError, read_volume
from components.data.preprocess import PreprocessSpec, acquisition_plane, output_grid, preprocess_volume


def apply_overrides(vol: Volume, overrides: dict) -> Volume:
    """Dataset metadata that beats the file header (e.g. CT-RATE's spacing and rescale values)."""
    if "spacing" in overrides:
        sp = np.asarray(overrides["spacing"], dtype=np.float64)
        if sp.shape != (3,) or np.any(sp <= 0):
            raise VolumeError("bad_spacing", f"metadata spacing must be three positive numbers, got {overrides['spacing']}")
        cols = vol.affine[:3, :3] / np.linalg.norm(vol.affine[:3, :3], axis=0)
        vol.affine = vol.affine.copy()
        vol.affine[:3, :3] = cols * sp
    if "slope" in overrides:
        vol.slope, vol.intercept = float(overrides["slope"]), float(overrides.get("intercept", 0.0))
    return vol


def process_item(item: dict, spec: PreprocessSpec, storage: dict | None = None,
                 max_bytes: int = MAX_VOXEL_BYTES) -> tuple[dict | None, dict | None]:
    """``(record, None)`` on success, ``(None, quarantine record)`` on any failure."""
    uri = item["source_uri"]
    stage = "read"
    try:
        vol = read_volume(uri, item.get("format"), storage=storage, max_bytes=max_bytes)
        vol = apply_overrides(vol, item.get("overrides") or {})
        stage = "preprocess"
        array = preprocess_volume(vol, spec)
        if not np.all(np.isfinite(array)):
            raise VolumeError("non_finite", "preprocessing produced NaN/Inf values")
    except VolumeError as e:
        return None, quarantine(uri, stage, e.kind, str(e), item["id"])
    except MemoryError:
        return None, quarantine(uri, stage, "memory", "volume does not fit in memory", item["id"])
    except Exception as e:  # a reader bug must not stop the job; keep enough to debug it
        where = traceback.extract_tb(e.__traceback__)[-1]
        return None, quarantine(uri, stage, type(e).__name__, f"{e} (at {where.name}:{where.lineno})", item["id"])
    out_affine = output_grid(vol, spec) if vol.intensity == "hu" else None
    spacing_dhw = (np.linalg.norm(out_affine[:3, :3], axis=0)[::-1].tolist() if out_affine is not None
                   else [float("nan")] * 3)
    record = {
        "id": item["id"], "split": item.get("split", ""), "volume": array, "spec": spec.name,
        "spacing_mm": [float(x) for x in spacing_dhw],
        "source_spacing_mm": [float(x) for x in vol.spacing], "orientation": vol.orientation,
        "plane": acquisition_plane(vol.affine), "source_shape": [int(x) for x in vol.array.shape],
        "source_uri": uri, "source_sha256": vol.meta.get("sha256", ""),
    }
    return record, None
