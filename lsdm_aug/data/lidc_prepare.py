"""Real LIDC-IDRI preparation with pylidc and DICOM (LSDM thesis, section 4.1).

For each scan found under ``dicom_root`` whose slice thickness is at most 2.5 mm: load the
volume with pylidc, cluster its annotations into nodules and build their 50 % consensus masks,
take 20 % of the slices (nodule slices around each nodule's centre, nodule-free slices uniformly),
clip HU to [-1024, 800] and scale to [-1, 1], compute the 8-label semantic map, and write each slice
to the prepared layout of :mod:`lsdm_aug.data.prepared`; splits are patient-wise.

Example:
    >>> prepare_lidc("/data/LIDC-IDRI", "prepared/lidc-512")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from skimage.transform import resize

from lsdm_aug.data.lidc import CONSENSUS_LEVEL, nodule_record
from lsdm_aug.data.prepared import PreparedCase, PreparedDataset, PreparedDatasetWriter, hu_to_unit
from lsdm_aug.data.pylidc_compat import import_pylidc, use_dicom_root
from lsdm_aug.data.semantic import lung_mask_from_hu, malignancy_label, semantic_map_from_hu
from lsdm_aug.progress import track_progress

__all__ = ["find_lidc_scans", "select_slices", "scan_cases", "prepare_lidc", "NoLidcSeriesError"]


class NoLidcSeriesError(FileNotFoundError):
    """The DICOM root holds no series that pylidc's database knows."""


def _patient_folders(dicom_root: Path) -> set[str]:
    return {entry.name for entry in os.scandir(dicom_root) if entry.is_dir()}


def find_lidc_scans(dicom_root: str | Path, max_slice_thickness_mm: float = 2.5,
                    patient_ids: Sequence[str] | None = None) -> list:
    """pylidc scans whose patient folder exists under ``dicom_root`` and whose slices are thin enough.

    Raises:
        FileNotFoundError: ``dicom_root`` is not a folder.
        NoLidcSeriesError: no folder under it is named after an LIDC patient with such a scan.
    """
    root = Path(dicom_root)
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM root {str(dicom_root)!r} is not an existing folder")
    if max_slice_thickness_mm <= 0:
        raise ValueError(f"max slice thickness must be > 0 mm, got {max_slice_thickness_mm!r}")
    pylidc = import_pylidc()
    present = _patient_folders(root)
    if patient_ids is not None:
        present &= set(patient_ids)
    scans = (pylidc.query(pylidc.Scan).filter(pylidc.Scan.patient_id.in_(sorted(present)))
             .filter(pylidc.Scan.slice_thickness <= max_slice_thickness_mm).order_by(pylidc.Scan.id).all())
    if not scans:
        raise NoLidcSeriesError(
            f"DICOM root {str(dicom_root)!r} has no LIDC series with slice thickness <= {max_slice_thickness_mm} mm "
            "(expected folders named like LIDC-IDRI-0001 holding .dcm files)")
    return scans


def select_slices(n_slices: int, nodule_slices: dict[int, Sequence[int]], centre_slices: Sequence[int],
                  fraction: float = 0.2) -> list[int]:
    """Indices of the slices to keep from one scan.

    ``fraction`` of the nodule slices, always including each nodule's centre slice, and
    ``fraction`` of the nodule-free slices, spread uniformly over the scan.

    Args:
        n_slices: slices in the scan.
        nodule_slices: slice index -> nodules present there.
        centre_slices: the centre slice of each nodule.
        fraction: share of slices kept, in (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"slice fraction must be in (0, 1], got {fraction!r}")
    with_nodules = sorted(nodule_slices)
    free = [k for k in range(n_slices) if k not in nodule_slices]
    chosen = set(int(k) for k in centre_slices)
    extra = [k for k in with_nodules if k not in chosen]
    budget = max(0, round(fraction * len(with_nodules)) - len(chosen))
    chosen.update(_uniform(extra, budget))
    chosen.update(_uniform(free, round(fraction * len(free))))
    return sorted(chosen)


def _uniform(items: Sequence[int], count: int) -> list[int]:
    if count <= 0 or not items:
        return []
    positions = np.linspace(0, len(items) - 1, min(count, len(items))).round().astype(int)
    return [items[p] for p in np.unique(positions)]


def _nodule_volume(scan, clusters) -> tuple[np.ndarray, list[dict]]:
    """Scan-shaped label volume (k = k-th nodule, 1-based) from consensus masks, and the nodules' rows."""
    pylidc = import_pylidc()
    shape = (512, 512, len(scan.slice_zvals))
    labels = np.zeros(shape, np.uint8)
    records = []
    for index, readings in enumerate(clusters):  # one nodule's annotations by up to four radiologists
        mask, bbox = pylidc.utils.consensus(readings, clevel=CONSENSUS_LEVEL, ret_masks=False)
        if not mask.any():
            continue
        records.append(nodule_record(scan, index, readings, (mask, bbox)))
        region = labels[bbox]
        region[mask] = len(records)
    return labels, records


def _case_id(scan, slice_index: int) -> str:
    return f"{scan.patient_id}_scan{scan.id:04d}_slice{slice_index:03d}"


def _resize_case(image, semantic_map, nodule_mask, lung_mask, size):
    if size is None or image.shape == (size, size):
        return image, semantic_map, nodule_mask, lung_mask
    shape = (size, size)
    return (resize(image, shape, order=1, anti_aliasing=True, preserve_range=True).astype(np.float32),
            resize(semantic_map, shape, order=0, preserve_range=True, anti_aliasing=False).astype(np.uint8),
            resize(nodule_mask, shape, order=0, preserve_range=True, anti_aliasing=False).astype(np.uint8),
            resize(lung_mask, shape, order=0, preserve_range=True, anti_aliasing=False).astype(bool))


def _slice_nodules(labels_2d: np.ndarray, records: list[dict]) -> tuple[np.ndarray, list[dict]]:
    """Renumber the nodules present in one slice 1..n and describe each there."""
    mask = np.zeros(labels_2d.shape, np.uint8)
    nodules = []
    for k in np.unique(labels_2d[labels_2d > 0]):
        rows, cols = np.nonzero(labels_2d == k)
        mask[labels_2d == k] = len(nodules) + 1
        record = dict(records[int(k) - 1])  # centre_row/col become this slice's; centre_slice stays the nodule's
        record.update(centre_row=float(rows.mean()), centre_col=float(cols.mean()), area_px=int(rows.size),
                      malignancy_class=malignancy_label(record["malignancy"]))
        nodules.append(record)
    return mask, nodules


def scan_cases(scan, fraction: float = 0.2, size: int | None = None, skip: set[str] = frozenset()) -> Iterator[PreparedCase]:
    """Prepared cases of one scan (DICOM must be reachable, see :func:`use_dicom_root`).

    Args:
        scan: a pylidc ``Scan``.
        fraction: share of slices kept (see :func:`select_slices`).
        size: resize slices to ``size`` x ``size`` pixels; native (512) when ``None``.
        skip: case ids already written; the volume is not even loaded when all are there.
    """
    clusters = scan.cluster_annotations(verbose=False)
    labels, records = _nodule_volume(scan, clusters)
    present = {int(k): np.unique(labels[:, :, k][labels[:, :, k] > 0]).tolist() for k in range(labels.shape[2])
               if labels[:, :, k].any()}
    centres = [int(np.clip(round(r["centre_slice"]), 0, labels.shape[2] - 1)) for r in records]
    wanted = [k for k in select_slices(labels.shape[2], present, centres, fraction) if _case_id(scan, k) not in skip]
    if not wanted:
        return
    try:
        volume = scan.to_volume(verbose=False)
    except (OSError, RuntimeError) as error:  # pylidc's "Couldn't find DICOM files for ..."
        raise NoLidcSeriesError(f"no DICOM series of scan {scan.series_instance_uid} for {scan.patient_id}: {error}") from error
    if volume.shape != labels.shape:
        raise ValueError(f"scan {scan.patient_id} (id {scan.id}): DICOM volume {volume.shape} does not match "
                         f"the database geometry {labels.shape}")
    spacing = float(scan.pixel_spacing)
    for k in wanted:
        hu = volume[:, :, k].astype(np.float32)
        nodule_mask, nodules = _slice_nodules(labels[:, :, k], records)
        lung = lung_mask_from_hu(hu, spacing)
        semantic_map = semantic_map_from_hu(hu, nodule_mask, [n["malignancy"] for n in nodules], spacing, lung)
        image, semantic_map, nodule_mask, lung = _resize_case(hu_to_unit(hu), semantic_map, nodule_mask, lung, size)
        out_spacing = spacing * 512 / (size or 512)
        yield PreparedCase(case_id=_case_id(scan, k), patient_id=scan.patient_id, image=image, semantic_map=semantic_map,
                           nodule_mask=nodule_mask, lung_mask=lung, spacing_mm=out_spacing, nodules=nodules,
                           source={"kind": "lidc", "scan_id": int(scan.id), "slice_index": int(k),
                                   "z_mm": float(scan.slice_zvals[k])})


def prepare_lidc(dicom_root: str | Path, out_dir: str | Path, max_slice_thickness_mm: float = 2.5,
                 slice_fraction: float = 0.2, size: int | None = None, seed: int = 0,
                 split_fractions: dict[str, float] | None = None, patient_ids: Sequence[str] | None = None,
                 progress: bool = False) -> PreparedDataset:
    """Prepare LIDC-IDRI slices from DICOM into the prepared layout; a rerun continues.

    Args:
        dicom_root: folder with one sub-folder per patient (``LIDC-IDRI-0001/...``) holding ``.dcm`` files.
        out_dir: output folder.
        max_slice_thickness_mm: thicker scans are skipped (thesis: 2.5 mm).
        slice_fraction: share of each scan's slices kept (thesis: 20 %).
        size: output slice size; native 512 when ``None``.
        seed: seeds the patient-wise split.
        split_fractions: default 80/10/10 % train/validation/test patients.
        patient_ids: restrict to these patients.
        progress: show a rich progress bar over scans.
    """
    if size is not None and size <= 0:
        raise ValueError(f"size must be > 0 pixels, got {size!r}")
    scans = find_lidc_scans(dicom_root, max_slice_thickness_mm, patient_ids)
    fractions = split_fractions or {"train": 0.8, "validation": 0.1, "test": 0.1}
    settings = {"source": "lidc", "max_slice_thickness_mm": max_slice_thickness_mm, "slice_fraction": slice_fraction,
                "size": size, "seed": seed, "split_fractions": fractions}
    writer = PreparedDatasetWriter(out_dir, settings)
    done = {path.stem for path in (writer.root / "cases").glob("*.npz")}
    missing: list[str] = []
    with use_dicom_root(dicom_root):
        for scan in track_progress(scans, "LIDC scans", enabled=progress):
            try:
                for case in scan_cases(scan, slice_fraction, size, skip=done):
                    writer.write(case)
            except NoLidcSeriesError as error:  # a partial download: the other series still count
                missing.append(str(error))
    if len(missing) == len(scans):
        raise NoLidcSeriesError(f"DICOM root {str(dicom_root)!r} holds none of the LIDC series its folders name "
                                f"({missing[0]})")
    for message in missing:
        warnings.warn(message, stacklevel=2)
    return writer.finalize(fractions, seed)
