"""The nnU-Net v2 raw dataset format, written by one helper.

``DatasetXXX_Name/imagesTr/<case>_0000.nii.gz``, ``labelsTr/<case>.nii.gz`` and ``dataset.json``
(written with nnU-Net's own ``generate_dataset_json``). 2D slices are stored as NIfTI volumes of one
slice with a large z spacing, which nnU-Net plans as 2D data. A case of several channels (e.g. a slice and
its neighbours, for a 2.5D detector) has one image file per channel, ``<case>_0000``, ``<case>_0001``, ...,
as nnU-Net expects. Every file is written atomically.

Example:
    >>> write_case("Dataset501_Nodules", "case_0000", hu_slice, label_slice, spacing_mm=(0.7, 0.7))  # doctest: +SKIP
    >>> write_dataset_json("Dataset501_Nodules", num_training=1)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

__all__ = ["write_case", "read_case", "read_label", "write_dataset_json", "case_paths", "LABELS", "SLICE_THICKNESS_2D"]

LABELS = {"background": 0, "nodule": 1}
SLICE_THICKNESS_2D = 999.0


def case_paths(root: str | Path, case_id: str, channel: int = 0) -> tuple[Path, Path]:
    """(image file of ``channel``, label file) of a case."""
    root = Path(root)
    return root / "imagesTr" / f"{case_id}_{channel:04d}.nii.gz", root / "labelsTr" / f"{case_id}.nii.gz"


def _write(array: np.ndarray, spacing_mm: Sequence[float], path: Path) -> None:
    volume = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)  # SimpleITK wants (z, y, x)
    image = sitk.GetImageFromArray(volume)
    spacing = [float(s) for s in spacing_mm]
    image.SetSpacing((spacing[1], spacing[0], spacing[2] if len(spacing) > 2 else SLICE_THICKNESS_2D))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".nii.gz")
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, useCompression=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_case(root: str | Path, case_id: str, image_hu: np.ndarray, label: np.ndarray,
               spacing_mm: Sequence[float]) -> None:
    """Write one case: the CT in HU (int16) and its label map (uint8), image first, each atomically.

    ``image_hu`` is shaped as ``label``, or has one more, leading axis of channels (one file per channel)."""
    channels = image_hu if image_hu.ndim == label.ndim + 1 else image_hu[None]
    if channels.shape[1:] != label.shape or not len(channels):
        raise ValueError(f"case {case_id!r}: image {image_hu.shape} and label {label.shape} differ in shape "
                         "(an image may have one more, leading axis of channels)")
    for channel, image in enumerate(channels):
        _write(np.round(image).astype(np.int16), spacing_mm, case_paths(root, case_id, channel)[0])
    _write(label.astype(np.uint8), spacing_mm, case_paths(root, case_id)[1])


def read_case(root: str | Path, case_id: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(image, label, spacing (row, col[, slice]) in mm) of a case, 2D when it has one slice; an image of several
    channels has them on a leading axis."""
    image_path, _ = case_paths(root, case_id)
    label, _ = read_label(root, case_id)
    images = [_read(image_path)]
    while (path := case_paths(root, case_id, len(images))[0]).is_file():
        images.append(_read(path))
    image = images[0][0] if len(images) == 1 else np.stack([array for array, _ in images])
    return image, label, images[0][1]


def read_label(root: str | Path, case_id: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """(label, spacing in mm) of a case without reading its image (what scoring a prediction needs)."""
    return _read(case_paths(root, case_id)[1])


def _read(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """(array, spacing) of one file: (H, W) and (row, col) for one slice, else (H, W, D) and (row, col, slice)."""
    image = sitk.ReadImage(str(path))
    array, spacing = sitk.GetArrayFromImage(image), image.GetSpacing()
    if array.shape[0] == 1:
        return array[0], (spacing[1], spacing[0])
    return np.moveaxis(array, 0, -1), (spacing[1], spacing[0], spacing[2])


def write_dataset_json(root: str | Path, num_training: int, name: str = "lsdm-aug synthetic nodules",
                       description: str = "", channels: int = 1) -> None:
    """nnU-Net's dataset.json: ``channels`` CT channels, labels background / nodule, .nii.gz files."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels!r}")
    generate_dataset_json(str(root), channel_names=dict.fromkeys(range(channels), "CT"), labels=LABELS,
                          num_training_cases=num_training,
                          file_ending=".nii.gz", dataset_name=name, description=description,
                          license="LIDC-IDRI annotations CC BY 3.0; synthetic images", converted_by="lsdm-aug")
