"""Why a training arm's nodules help the detector or not: each arm's added nodules measured against the held-out
real nodules, on the labelled slice: appearance (a small classifier that tries to tell them from real ones; AUC
0.5 means it cannot), size (equivalent diameter) and placement (distance to the pleura, contact with vessels).

Copy-paste nodules are real nodules moved, so their appearance AUC is the control: what "indistinguishable" reads
as with this many nodules.

Example:
    >>> hu = np.full((64, 64), -850.0)
    >>> rows, cols = np.ogrid[:64, :64]
    >>> label = ((rows - 32) ** 2 + (cols - 32) ** 2 <= 36).astype(np.uint8)
    >>> hu[label > 0] = 20.0
    >>> lung = np.zeros((64, 64), bool); lung[8:56, 8:56] = True
    >>> m = nodule_measurements(hu, label, 0.7, lung)[0]
    >>> round(m["diameter_mm"], 1), round(m["pleura_mm"], 1), m["vessel_contact"]
    (8.4, 16.8, 0.0)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from lsdm_aug.data.nnunet_format import read_case
from lsdm_aug.metrics.auc import labelled_auc

__all__ = ["APPEARANCE_FEATURES", "nodule_measurements", "background_of", "added_label", "dataset_nodules",
           "appearance_auc", "diagnose"]

RADIAL_BINS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # distance from the centre over the equivalent radius
APPEARANCE_FEATURES = ("mean_hu", "std_hu", "p10_hu", "p90_hu", "contrast_hu", "edge_hu_per_mm",
                       *(f"radial_{k}" for k in range(len(RADIAL_BINS) - 1)))
VESSEL_HU = -500.0  # lung pixels denser than this, around a nodule, are vessel (or other nodule) tissue
RING_MM = 2.0
BACKGROUND_SHARE = 0.9  # a case made from a background shares at least this share of its voxels with it


def _middle(image: np.ndarray) -> np.ndarray:
    """The labelled slice of a case: the middle channel of a 2.5D slab (channels first), else the slice."""
    return image[image.shape[0] // 2] if image.ndim == 3 else image


def nodule_measurements(hu: np.ndarray, label: np.ndarray, spacing_mm: float,
                        lung: np.ndarray | None = None) -> list[dict[str, float]]:
    """One row per nodule (connected component of ``label``) of an (H, W) slice in HU: its appearance
    (:data:`APPEARANCE_FEATURES`), equivalent diameter, distance from its centre to the nearest pixel outside
    the lung fields (``lung``; computed from the slice when ``None``) and the share of the lung ring of
    ``RING_MM`` around it denser than ``VESSEL_HU`` (vessel contact)."""
    if hu.shape != label.shape or hu.ndim != 2:
        raise ValueError(f"expected an (H, W) slice and label of one shape, got {hu.shape} and {label.shape}")
    if not np.isfinite(spacing_mm) or spacing_mm <= 0:
        raise ValueError(f"spacing_mm must be > 0, got {spacing_mm!r}")
    hu = np.asarray(hu, np.float32)
    components, count = ndimage.label(label > 0)
    if not count:
        return []
    if lung is None:
        from lsdm_aug.data.semantic import lung_mask_from_hu

        lung = lung_mask_from_hu(hu, spacing_mm)
    pleura_px = ndimage.distance_transform_edt(np.asarray(lung, bool) | (components > 0))
    gradient = np.hypot(*np.gradient(ndimage.gaussian_filter(hu, 0.7), spacing_mm))
    ring_px = max(1, int(round(RING_MM / spacing_mm)))
    rows = []
    for k, box in enumerate(ndimage.find_objects(components), start=1):
        rows.append(_one_nodule(hu, components == k, box, spacing_mm, pleura_px, gradient, ring_px,
                                np.asarray(lung, bool)))
    return rows


def _one_nodule(hu: np.ndarray, mask: np.ndarray, box: tuple[slice, slice], spacing_mm: float, pleura_px: np.ndarray,
                gradient: np.ndarray, ring_px: int, lung: np.ndarray) -> dict[str, float]:
    """One nodule's row, computed in its bounding box widened by the outer radial bin and the ring."""
    area = float(mask[box].sum())
    radius_px = np.sqrt(area / np.pi)
    margin = int(np.ceil(RADIAL_BINS[-1] * radius_px)) + ring_px + 2
    window = tuple(slice(max(0, s.start - margin), min(n, s.stop + margin)) for s, n in zip(box, hu.shape))
    hu, mask, gradient, lung = hu[window], mask[window], gradient[window], lung[window]
    inside = hu[mask]
    centre = ndimage.center_of_mass(mask)
    ring = ndimage.binary_dilation(mask, iterations=ring_px) & ~mask & lung
    boundary = mask & ~ndimage.binary_erosion(mask)
    rr, cc = np.indices(hu.shape)
    distance = np.hypot(rr - centre[0], cc - centre[1]) / max(radius_px, 0.5)
    radial = [float(hu[(distance >= lo) & (distance < hi)].mean()) if ((distance >= lo) & (distance < hi)).any()
              else float(inside.mean()) for lo, hi in zip(RADIAL_BINS[:-1], RADIAL_BINS[1:])]
    ring_hu = float(hu[ring].mean()) if ring.any() else float("nan")
    at = (int(round(centre[0])) + window[0].start, int(round(centre[1])) + window[1].start)
    return {"diameter_mm": float(2 * radius_px * spacing_mm),
            "pleura_mm": float(pleura_px[at]) * spacing_mm,
            "vessel_contact": float((hu[ring] > VESSEL_HU).mean()) if ring.any() else 0.0,
            "mean_hu": float(inside.mean()), "std_hu": float(inside.std()),
            "p10_hu": float(np.percentile(inside, 10)), "p90_hu": float(np.percentile(inside, 90)),
            "contrast_hu": float(inside.mean()) - ring_hu if ring.any() else 0.0,
            "edge_hu_per_mm": float(gradient[boundary].mean()),
            **{f"radial_{k}": value for k, value in enumerate(radial)}}


def background_of(image: np.ndarray, backgrounds: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> str | None:
    """The case of ``backgrounds`` (case id -> (image, label)) that ``image`` was made from: the one of the same shape
    with which it shares the most voxels, when that is at least ``BACKGROUND_SHARE`` of them; ``None`` when no
    background fits (a case drawn from scratch).

    Example:
        >>> base = np.arange(100.0).reshape(10, 10); edited = base.copy(); edited[4, 4] = -1
        >>> background_of(edited, {"a": (base, base * 0), "b": (base + 1, base * 0)})
        'a'
    """
    best, shared = None, 0.0
    for case_id, (candidate, _) in backgrounds.items():
        if candidate.shape == image.shape:
            share = float(np.mean(candidate == image))
            if share > shared:
                best, shared = case_id, share
    return best if shared >= BACKGROUND_SHARE else None


def added_label(label: np.ndarray, background_label: np.ndarray) -> np.ndarray:
    """``label`` keeping only the nodules its background did not have: connected components that touch none of
    the background's labelled voxels.

    Example:
        >>> old = np.zeros((8, 8), np.uint8); old[1:3, 1:3] = 1
        >>> new = old.copy(); new[5:7, 5:7] = 1
        >>> int(added_label(new, old).sum())
        4
    """
    components, count = ndimage.label(label > 0)
    kept = [k for k in range(1, count + 1) if not (background_label[components == k] > 0).any()]
    return np.isin(components, kept).astype(np.uint8)


def dataset_nodules(root: str | Path, case_ids: Iterable[str],
                    backgrounds: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> pd.DataFrame:
    """:func:`nodule_measurements` of every nodule of the nnU-Net cases ``case_ids`` in ``root`` (their labelled
    slice), one row each with its ``case_id``. With ``backgrounds`` (case id -> (image, label)), a case made from
    one of them (:func:`background_of`) is measured on the nodules it added only (:func:`added_label`): an LSDM or
    copy-paste case keeps the real nodules its background slice already had."""
    rows = []
    for case_id in case_ids:
        image, label, spacing = read_case(root, case_id)
        background = background_of(image, backgrounds) if backgrounds else None
        if background is not None:
            label = added_label(label, backgrounds[background][1])
        rows += [{"case_id": case_id, "background": background, **m}
                 for m in nodule_measurements(_middle(image).astype(np.float32), label, float(spacing[0]))]
    return pd.DataFrame(rows)


def appearance_auc(real: pd.DataFrame, other: pd.DataFrame, seed: int = 0, folds: int = 5,
                   repeats: int = 5) -> float | None:
    """Cross-validated ROC AUC of a logistic regression on :data:`APPEARANCE_FEATURES` telling ``other``'s nodules
    from ``real``'s: stratified ``folds``-fold (every nodule scored by a model that did not see it), the AUC
    averaged over ``repeats`` shuffles of the folds. 0.5: not told apart; 1: always. With a few dozen nodules a
    set drawn like the real one still scatters by about ±0.15 around 0.5 (hence copy-paste as the control).
    ``None`` when either side has fewer nodules than folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if min(len(real), len(other)) < folds:
        return None
    features = np.nan_to_num(np.concatenate([real[list(APPEARANCE_FEATURES)].to_numpy(float),
                                             other[list(APPEARANCE_FEATURES)].to_numpy(float)]))
    target = np.r_[np.zeros(len(real)), np.ones(len(other))]
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    aucs = [labelled_auc(target, cross_val_predict(model, features, target, method="predict_proba",
                                                    cv=StratifiedKFold(folds, shuffle=True,
                                                                       random_state=seed + r))[:, 1])
            for r in range(repeats)]
    return float(np.mean(aucs))


def _summary(nodules: pd.DataFrame, real: pd.DataFrame, seed: int) -> dict[str, Any]:
    def quartiles(column: str) -> list[float]:
        return [float(v) for v in np.percentile(nodules[column], [25, 50, 75])] if len(nodules) else []

    return {"count": int(len(nodules)), "diameter_mm": quartiles("diameter_mm"), "pleura_mm": quartiles("pleura_mm"),
            "vessel_contact": float(nodules.vessel_contact.mean()) if len(nodules) else None,
            "mean_hu": quartiles("mean_hu"), "contrast_hu": quartiles("contrast_hu"),
            "edge_hu_per_mm": quartiles("edge_hu_per_mm"), "appearance_auc": appearance_auc(real, nodules, seed)}


def _case_ids(root: Path) -> list[str]:
    return sorted(p.name.removesuffix(".nii.gz") for p in (root / "labelsTr").glob("*.nii.gz"))


ADDED_CASES = {"real+synthetic": "lsdm_", "real+synthetic-unguided": "lsdm_", "real+copy-paste": "copypaste_"}


def diagnose(work: str | Path, datasets: dict[str, str], seed: int = 0) -> dict[str, Any]:
    """Each arm's added nodules against the held-out real ones (``work/test``), and the real training nodules
    too: ``datasets`` maps an arm (``real`` or a key of ``ADDED_CASES``) to its nnU-Net dataset name under
    ``work/raw``. Per set: count, quartiles of diameter, pleura distance, mean HU, contrast and edge, the mean
    vessel contact, and the appearance AUC against the test nodules (:func:`appearance_auc`). An arm's added cases
    are measured on the nodules they added to their real background slice only (:func:`dataset_nodules`)."""
    work = Path(work)
    real = dataset_nodules(work / "test", _case_ids(work / "test"))
    out: dict[str, Any] = {"test": _summary(real, real.iloc[:0], seed) | {"appearance_auc": None}}
    backgrounds = None
    for arm, name in datasets.items():
        root = work / "raw" / name
        prefix = ADDED_CASES.get(arm)
        if arm != "real" and prefix is None:
            raise ValueError(f"arm {arm!r} adds no cases to diagnose; allowed: real, {sorted(ADDED_CASES)}")
        if prefix is not None and backgrounds is None:
            if "real" not in datasets:
                raise ValueError(f"diagnosing {arm!r} needs the real training set: datasets has no 'real' key")
            real_root = work / "raw" / datasets["real"]
            backgrounds = {c: read_case(real_root, c)[:2] for c in _case_ids(real_root)}
        chosen = [c for c in _case_ids(root) if prefix is None or c.startswith(prefix)]
        out[arm] = _summary(dataset_nodules(root, chosen, backgrounds if prefix else None), real, seed)
    return out
