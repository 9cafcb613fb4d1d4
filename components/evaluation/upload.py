"""An uploaded volume -> the model's input tensor, or an :class:`UploadError` with an HTTP status.

Accepted: NIfTI (``.nii`` / ``.nii.gz``), a zip of one DICOM series, M3D-style ``.npy``. The
format is read from the bytes (magic numbers), not trusted from a file name. The volume goes
through the same reader checks and preprocessing spec as the training data, so the model
sees what it was trained on.
"""
from __future__ import annotations

import io
import os
import tempfile
import zipfile

import numpy as np

from components.data.io import MAX_VOXEL_BYTES, VolumeError, check_volume, nifti_from_bytes, npy_from_bytes
from components.data.preprocess import PreprocessSpec, get_spec, preprocess_volume

__all__ = ["UploadError", "sniff_format", "volume_from_upload"]

FORMATS = "NIfTI (.nii, .nii.gz), a zipped DICOM series (.zip) or a NumPy array (.npy)"


class UploadError(ValueError):
    """A refused upload; ``status`` is the HTTP status to answer with (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def sniff_format(data: bytes) -> str:
    """``nifti``, ``npy`` or ``dicom_zip`` from the first bytes; 415 for anything else."""
    if data[:4] == b"PK\x03\x04":
        return "dicom_zip"
    if data[:6] == b"\x93NUMPY":
        return "npy"
    if data[:2] == b"\x1f\x8b":
        return "nifti"  # gzip: only NIfTI is accepted compressed
    header_size = {int.from_bytes(data[:4], order) for order in ("little", "big")} if len(data) >= 4 else set()
    if header_size & {348, 540}:  # NIfTI-1 / NIfTI-2 sizeof_hdr, either byte order
        return "nifti"
    raise UploadError(415, f"unrecognised volume format; send {FORMATS}")


def _dicom_from_zip(data: bytes, max_bytes: int):
    from components.data.io import read_dicom_series

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()]
    except zipfile.BadZipFile as e:
        raise UploadError(422, f"not a readable zip file: {e}") from None
    if not members:
        raise UploadError(422, "the zip file is empty; put the DICOM series' files in it")
    unpacked = sum(m.file_size for m in members)
    if unpacked > max_bytes:  # refuse a zip bomb before inflating anything
        raise UploadError(413, f"the zip unpacks to {unpacked / 1024**2:.0f} MB, above the "
                               f"{max_bytes / 1024**2:.0f} MB limit")
    with tempfile.TemporaryDirectory(prefix="radray-upload-") as folder:
        for i, member in enumerate(members):
            # numbered names: member paths from the client never reach the file system
            with open(os.path.join(folder, f"{i:06d}.dcm"), "wb") as f:
                f.write(archive.read(member))
        return read_dicom_series(folder, max_bytes=max_bytes)


def volume_from_upload(data: bytes, spec: PreprocessSpec | str | dict,
                       max_voxel_bytes: int = MAX_VOXEL_BYTES) -> np.ndarray:
    """The uploaded bytes as the spec's ``(1, D, H, W)`` float array; :class:`UploadError` when refused."""
    spec = get_spec(spec)
    if not data:
        raise UploadError(400, f"empty body; send {FORMATS}")
    fmt = sniff_format(data)
    try:
        if fmt == "dicom_zip":
            vol = _dicom_from_zip(data, max_voxel_bytes)
        elif fmt == "npy":
            vol = npy_from_bytes(data, max_bytes=max_voxel_bytes)
        else:
            vol = nifti_from_bytes(data, max_bytes=max_voxel_bytes)
        check_volume(vol)
        array = preprocess_volume(vol, spec)
    except VolumeError as e:
        raise UploadError(413 if e.kind == "too_large" else 422, f"{fmt} upload refused ({e.kind}): {e}") from None
    except UploadError:
        raise
    except Exception as e:  # readers meet arbitrary bytes here; whatever they raise is the client's bad file
        raise UploadError(422, f"unreadable {fmt} upload: {type(e).__name__}: {e}") from None
    if not np.all(np.isfinite(array)):
        raise UploadError(422, "preprocessing produced NaN/Inf values")
    return array
