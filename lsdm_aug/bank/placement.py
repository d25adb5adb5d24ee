"""Placing a banked nodule into a slice: resample to the slice's spacing, then blend it in (Poisson).

Example:
    >>> patch, mask = bank_outline(bank.entry(3), spacing_mm=0.7)  # doctest: +SKIP
    >>> new_hu, region, footprint = place_patch(hu, patch, mask, centre=(200, 140))  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lsdm_aug.bank.blending import poisson_blend
from lsdm_aug.bank.store import BankEntry
from lsdm_aug.data.lidc import resample_mask

__all__ = ["bank_outline", "place_patch", "shrink_to_area"]

MARGIN_PX = 4


def bank_outline(entry: BankEntry, spacing_mm: float, size_mm: float | None = None,
                 diameter_mm: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The entry's patch (HU) and nodule mask at ``spacing_mm``, cropped to the nodule with a margin.

    ``size_mm`` rescales the nodule to that diameter (``diameter_mm``: the nodule's own)."""
    zoom = entry.spacing_mm / float(spacing_mm)
    if size_mm is not None and diameter_mm:
        zoom *= float(size_mm) / float(diameter_mm)
    mask = resample_mask(entry.mask, entry.spacing_mm, entry.spacing_mm / zoom)
    patch = ndimage.zoom(entry.patch_hu, np.array(mask.shape) / np.array(entry.patch_hu.shape), order=1,
                         mode="nearest")
    rows, cols = np.nonzero(mask)
    top, left = max(rows.min() - MARGIN_PX, 0), max(cols.min() - MARGIN_PX, 0)
    window = (slice(top, rows.max() + MARGIN_PX + 1), slice(left, cols.max() + MARGIN_PX + 1))
    return patch[window].astype(np.float32), mask[window]


def shrink_to_area(mask: np.ndarray, area: int) -> np.ndarray:
    """The ``area`` pixels of ``mask`` deepest inside it (a nodule's end slices, from its widest one)."""
    if area >= mask.sum():
        return mask.copy()
    depth = ndimage.distance_transform_edt(mask)
    keep = np.zeros(mask.shape, bool)
    order = np.argsort(-depth, axis=None, kind="stable")[:max(int(area), 1)]
    keep.flat[order] = True
    return keep & mask


def place_patch(hu: np.ndarray, patch: np.ndarray, mask: np.ndarray, centre: tuple[float, float],
                feather_px: int = 2, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blend ``patch`` (its nodule ``mask``) into slice ``hu``, the nodule centred at ``centre`` (row, col).

    ``keep`` (a part of ``mask``, e.g. from :func:`shrink_to_area`) places only that part, aligned as the whole.
    Returns the new slice (float), the nodule region and the footprint (region dilated by ``feather_px``),
    the only pixels that differ from ``hu``. The nodule keeps its contrast to the lung around it while
    taking on the local lung level (Poisson blending on the footprint).
    """
    rows, cols = np.nonzero(mask)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    top = int(round(centre[0] - height / 2)) - rows.min()
    left = int(round(centre[1] - width / 2)) - cols.min()
    if top < 1 or left < 1 or top + mask.shape[0] >= hu.shape[0] or left + mask.shape[1] >= hu.shape[1]:
        raise ValueError(f"a {mask.shape} nodule patch centred at {tuple(centre)} does not fit a {hu.shape} slice")
    window = (slice(top, top + mask.shape[0]), slice(left, left + mask.shape[1]))
    region = np.zeros(hu.shape, bool)
    region[window] = mask if keep is None else keep & mask
    footprint = ndimage.binary_dilation(region, iterations=feather_px)
    inside = np.zeros(hu.shape, bool)
    inside[window] = True
    footprint &= ndimage.binary_erosion(inside, iterations=1, border_value=0)  # the patch holds the footprint
    footprint |= region
    source = np.asarray(hu, np.float64).copy()
    source[window] = patch
    blended = poisson_blend(hu, source, footprint)
    return blended, region, footprint
