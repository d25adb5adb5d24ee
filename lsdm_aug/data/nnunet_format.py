"""The nnU-Net v2 raw dataset format, written by one helper.

``DatasetXXX_Name/imagesTr/<case>_0000.nii.gz``, ``labelsTr/<case>.nii.gz`` and ``dataset.json``
(written with nnU-Net's own ``generate_dataset_json``). 2D slices are stored as NIfTI volumes of one
slice with a large z spacing, which nnU-Net plans as 2D data. Every file is written atomically.

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

__all__ = ["write_case", "read_case", "write_dataset_json", "case_paths", "LABELS", "SLICE_THICKNESS_2D"]

LABELS = {"background": 0, "nodule": 1}
SLICE_THICKNESS_2D = 999.0


def case_paths(root: str | Path, case_id: str) -> tuple[Path, Path]:
    root = Path(root)
    return root / "imagesTr" / f"{case_id}_0000.nii.gz", root / "labelsTr" / f"{case_id}.nii.gz"


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
    """Write one case: the CT in HU (int16) and its label map (uint8), image first, each atomically."""
    if image_hu.shape != label.shape:
        raise ValueError(f"case {case_id!r}: image {image_hu.shape} and label {label.shape} differ in shape")
    image_path, label_path = case_paths(root, case_id)
    _write(np.round(image_hu).astype(np.int16), spacing_mm, image_path)
    _write(label.astype(np.uint8), spacing_mm, label_path)


def read_case(root: str | Path, case_id: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(image, label, spacing (row, col[, slice]) in mm) of a case, 2D when it has one slice."""
    image_path, label_path = case_paths(root, case_id)
    image, label = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
    arrays = [sitk.GetArrayFromImage(x) for x in (image, label)]
    spacing = image.GetSpacing()
    if arrays[0].shape[0] == 1:
        return arrays[0][0], arrays[1][0], (spacing[1], spacing[0])
    return np.moveaxis(arrays[0], 0, -1), np.moveaxis(arrays[1], 0, -1), (spacing[1], spacing[0], spacing[2])


def write_dataset_json(root: str | Path, num_training: int, name: str = "lsdm-aug synthetic nodules",
                       description: str = "") -> None:
    """nnU-Net's dataset.json: one CT channel, labels background / nodule, .nii.gz files."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    generate_dataset_json(str(root), channel_names={0: "CT"}, labels=LABELS, num_training_cases=num_training,
                          file_ending=".nii.gz", dataset_name=name, description=description,
                          license="LIDC-IDRI annotations CC BY 3.0; synthetic images", converted_by="lsdm-aug")
