"""The 8-label semantic map of a CT slice (LSDM thesis, section 4.3); the same code for phantom and real CT.

Labels:

====  ======================================  =================================
0     background                              air outside the body, anything else
1     body                                    HU in [-400, 0)
2     soft tissue                             HU in [0, 200)
3     high-dense tissue                       HU in [200, 800] (and above)
4     lung                                    K-means + morphology + marching squares
5     nodule, malignancy < 3
6     nodule, malignancy = 3
7     nodule, malignancy > 3
====  ======================================  =================================

The lung is not a threshold: K-means on the intensities of the central region splits low from
high density, erosion and dilation remove vessels and noise, connected low-density regions that
touch the border or are larger than a maximum area (the air around the patient) are dropped, and
marching squares (:func:`skimage.measure.find_contours`) traces each kept region's outline, which
is filled to give the lung field with its vessels.

Example:
    >>> import numpy as np
    >>> from lsdm_aug.data.phantom import ChestPhantom, PhantomConfig
    >>> ct = ChestPhantom(PhantomConfig(size=128)).slice(0, seed=0)
    >>> semantic_map = semantic_map_from_hu(ct.hu, ct.nodule_mask, [n["malignancy"] for n in ct.nodules],
    ...                                     spacing_mm=ct.spacing_mm)
    >>> sorted(np.unique(semantic_map).tolist())[:5]
    [0, 1, 2, 3, 4]
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from enum import IntEnum

import numpy as np
from scipy import ndimage
from skimage.draw import polygon as fill_polygon
from skimage.measure import find_contours
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

__all__ = ["SemanticLabel", "NUM_LABELS", "lung_mask_from_hu", "semantic_map_from_hu", "malignancy_label"]


class SemanticLabel(IntEnum):
    """Values of the semantic map."""

    BACKGROUND = 0
    BODY = 1
    SOFT_TISSUE = 2
    HIGH_DENSE = 3
    LUNG = 4
    NODULE_BENIGN = 5
    NODULE_INDETERMINATE = 6
    NODULE_MALIGNANT = 7


NUM_LABELS = len(SemanticLabel)
BODY_HU = (-400.0, 0.0)
SOFT_TISSUE_HU = (0.0, 200.0)
HIGH_DENSE_HU = (200.0, 800.0)
#: K-means splits lung from soft tissue; its threshold is kept in this range, so that an image of one kind of tissue
#: (a patch inside the lung, or inside the chest wall) is not split down the middle of its noise.
LUNG_THRESHOLD_HU = (-700.0, -300.0)
#: Low-density regions whose median lies below this are air (around the patient), not lung.
AIR_HU = -950.0


def malignancy_label(malignancy: float) -> int:
    """Semantic label of a nodule: 5 if malignancy < 3, 6 if = 3, 7 if > 3 (a median of ratings is allowed)."""
    if not np.isfinite(malignancy) or not 1 <= malignancy <= 5:
        raise ValueError(f"malignancy must be in 1..5, got {malignancy!r}")
    if malignancy < 3:
        return int(SemanticLabel.NODULE_BENIGN)
    return int(SemanticLabel.NODULE_INDETERMINATE if malignancy == 3 else SemanticLabel.NODULE_MALIGNANT)


def _kmeans_threshold(hu: np.ndarray, seed: int = 0) -> float:
    """Midpoint of the two K-means centres of the central region's intensities."""
    h, w = hu.shape
    centre = hu[h // 5: h - h // 5, w // 5: w - w // 5].reshape(-1, 1)
    centre = np.clip(centre, -1024, 800)
    if centre.size > 20000:
        centre = centre[np.random.default_rng(seed).choice(centre.size, 20000, replace=False)]
    if np.unique(centre).size < 2:  # one intensity (all air, all tissue): nothing to split, no lung
        return float("-inf")
    with threadpool_limits(limits=1, user_api="openmp"), warnings.catch_warnings():  # threads only slow it down
        warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct values than clusters: handled above
        kmeans = KMeans(n_clusters=2, n_init=3, random_state=seed).fit(centre)
    return float(np.clip(np.mean(kmeans.cluster_centers_), *LUNG_THRESHOLD_HU))


def _disk(radius_px: float) -> np.ndarray:
    """Disk-shaped structuring element (at least 3 x 3)."""
    r = max(1, int(round(radius_px)))
    rows, cols = np.ogrid[-r:r + 1, -r:r + 1]
    return rows**2 + cols**2 <= radius_px**2 + 0.5 if radius_px >= 1 else np.ones((3, 3), bool)


def _closing(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Binary closing with a disk, padded so that regions near the border are not cut."""
    pad = int(np.ceil(radius_px)) + 1
    return ndimage.binary_closing(np.pad(mask, pad), _disk(radius_px))[pad:-pad, pad:-pad]


def lung_mask_from_hu(hu: np.ndarray, spacing_mm: float, min_area_mm2: float = 400.0,
                      max_area_fraction: float = 0.5, closing_mm: float = 5.0,
                      bridge_mm: float = 1.5) -> np.ndarray:
    """Lung fields of an axial CT slice (HU), or of a patch cut from one, vessels included.

    Low-density regions (below the K-means threshold between lung and soft tissue) are lung unless they are small
    (trachea, bowel gas) or air: a region whose median is below ``AIR_HU``, or, when it touches the image border or
    covers more than ``max_area_fraction`` of it (as the air around a patient does), one that is not clearly
    denser than air. A patch inside the lung is therefore lung although its parenchyma touches every border.

    Args:
        hu: (H, W) slice in Hounsfield units.
        spacing_mm: pixel spacing, to size the morphology and the minimum lung area.
        min_area_mm2: low-density regions smaller than this (trachea, bowel gas) are not lung.
        max_area_fraction: regions larger than this fraction of the image, like those touching its border, must be
            denser than air to count as lung.
        closing_mm: radius of the closing that bridges vessels at the lung edge (kept regions only).
        bridge_mm: radius of the first, small closing that rejoins lung pieces cut by thin vessels.

    Returns:
        Boolean mask of the lung fields.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> patch = rng.normal(-850, 25, (96, 96)); patch[40:44, :] = 40.0  # lung cut by a vessel
        >>> round(float(lung_mask_from_hu(patch, 0.7).mean()), 2)
        1.0
        >>> bool(lung_mask_from_hu(rng.normal(-1000, 20, (96, 96)), 0.7).any())  # air outside a patient
        False
    """
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError(f"expected a 2D slice, got shape {hu.shape}")
    low = ndimage.gaussian_filter(hu, 0.5) < _kmeans_threshold(hu)
    if spacing_mm <= 1.0:  # erosion + dilation: drop noise specks (coarser pixels have none to drop)
        low = ndimage.binary_opening(low, _disk(1.0 / spacing_mm))
    # a small closing joins lung pieces that thin vessels cut apart, without reaching the trachea
    labels, count = ndimage.label(_closing(low, bridge_mm / spacing_mm))
    areas = ndimage.sum(low, labels, range(1, count + 1))
    medians = ndimage.median(hu, np.where(low, labels, 0), range(1, count + 1)) if count else []  # low pixels only
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])).tolist())
    min_area_px = min_area_mm2 / spacing_mm**2
    keep = [k for k, (area, median) in enumerate(zip(areas, medians), start=1)  # drop small air (trachea, gas) and
            if area >= min_area_px and _lung_like(median,                      # the air around the patient
                                                  k in border or area > max_area_fraction * hu.size)]
    # dilation + erosion of the kept regions only: bridge the vessels that cut into the lung edge
    closed = _closing(np.isin(labels, keep), closing_mm / spacing_mm)
    lung = np.zeros(hu.shape, bool)
    region = np.pad(closed, 1).astype(np.float32)
    for contour in find_contours(region, 0.5):  # marching squares; filling every contour fills the holes
        rows, cols = fill_polygon(contour[:, 0] - 1, contour[:, 1] - 1, shape=hu.shape)
        lung[rows, cols] = True
    return lung


def _lung_like(median_hu: float, air_suspect: bool) -> bool:
    """Whether a low-density region is lung rather than air: its median HU above ``AIR_HU``, and for a region placed
    or sized like the air around a patient (``air_suspect``) clearly so (50 HU above)."""
    return float(median_hu) > AIR_HU + (50.0 if air_suspect else 0.0)


def semantic_map_from_hu(hu: np.ndarray, nodule_mask: np.ndarray | None = None,
                         malignancies: Sequence[float] = (), spacing_mm: float | None = None,
                         lung_mask: np.ndarray | None = None) -> np.ndarray:
    """The 8-label semantic map of an axial CT slice.

    Args:
        hu: (H, W) slice in Hounsfield units.
        nodule_mask: (H, W) 0 outside nodules, ``k`` inside the nodule whose malignancy is
            ``malignancies[k - 1]``.
        malignancies: malignancy rating (1..5, median allowed) of each nodule in ``nodule_mask``.
        spacing_mm: pixel spacing (required: the lung's morphology is sized in mm).
        lung_mask: precomputed lung fields; computed with :func:`lung_mask_from_hu` when ``None``.

    Returns:
        (H, W) uint8 map with labels 0..7 (see :class:`SemanticLabel`).
    """
    if spacing_mm is None or not np.isfinite(spacing_mm) or spacing_mm <= 0:
        raise ValueError(f"spacing_mm must be the slice's pixel spacing in mm (> 0), got {spacing_mm!r}")
    hu = np.asarray(hu, dtype=np.float32)
    semantic_map = np.zeros(hu.shape, np.uint8)
    semantic_map[(hu >= BODY_HU[0]) & (hu < BODY_HU[1])] = SemanticLabel.BODY
    semantic_map[(hu >= SOFT_TISSUE_HU[0]) & (hu < SOFT_TISSUE_HU[1])] = SemanticLabel.SOFT_TISSUE
    semantic_map[hu >= HIGH_DENSE_HU[0]] = SemanticLabel.HIGH_DENSE
    lung = lung_mask_from_hu(hu, spacing_mm) if lung_mask is None else np.asarray(lung_mask, bool)
    semantic_map[lung] = SemanticLabel.LUNG
    if nodule_mask is not None:
        nodule_mask = np.asarray(nodule_mask)
        present = np.unique(nodule_mask[nodule_mask > 0])
        if len(present) and present.max() > len(malignancies):
            raise ValueError(f"nodule_mask has nodule {int(present.max())} but only {len(malignancies)} malignancies given")
        for k in present:
            semantic_map[nodule_mask == k] = malignancy_label(malignancies[int(k) - 1])
    return semantic_map
