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

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from lsdm_aug.data.nnunet_format import read_case

__all__ = ["APPEARANCE_FEATURES", "nodule_measurements", "dataset_nodules", "appearance_auc", "diagnose"]

RADIAL_BINS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # distance from the centre over the equivalent radius
APPEARANCE_FEATURES = ("mean_hu", "std_hu", "p10_hu", "p90_hu", "contrast_hu", "edge_hu_per_mm",
                       *(f"radial_{k}" for k in range(len(RADIAL_BINS) - 1)))
VESSEL_HU = -500.0  # lung pixels denser than this, around a nodule, are vessel (or other nodule) tissue
RING_MM = 2.0


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
    for k in range(1, count + 1):
        mask = components == k
        rows.append(_one_nodule(hu, mask, spacing_mm, pleura_px, gradient, ring_px, np.asarray(lung, bool)))
    return rows


def _one_nodule(hu: np.ndarray, mask: np.ndarray, spacing_mm: float, pleura_px: np.ndarray,
                gradient: np.ndarray, ring_px: int, lung: np.ndarray) -> dict[str, float]:
    inside = hu[mask]
    area = float(mask.sum())
    radius_px = np.sqrt(area / np.pi)
    centre = ndimage.center_of_mass(mask)
    ring = ndimage.binary_dilation(mask, iterations=ring_px) & ~mask & lung
    boundary = mask & ~ndimage.binary_erosion(mask)
    rr, cc = np.indices(hu.shape)
    distance = np.hypot(rr - centre[0], cc - centre[1]) / max(radius_px, 0.5)
    radial = [float(hu[(distance >= lo) & (distance < hi)].mean()) if ((distance >= lo) & (distance < hi)).any()
              else float(inside.mean()) for lo, hi in zip(RADIAL_BINS[:-1], RADIAL_BINS[1:])]
    ring_hu = float(hu[ring].mean()) if ring.any() else float("nan")
    return {"diameter_mm": float(2 * radius_px * spacing_mm),
            "pleura_mm": float(pleura_px[int(round(centre[0])), int(round(centre[1]))]) * spacing_mm,
            "vessel_contact": float((hu[ring] > VESSEL_HU).mean()) if ring.any() else 0.0,
            "mean_hu": float(inside.mean()), "std_hu": float(inside.std()),
            "p10_hu": float(np.percentile(inside, 10)), "p90_hu": float(np.percentile(inside, 90)),
            "contrast_hu": float(inside.mean()) - ring_hu if ring.any() else 0.0,
            "edge_hu_per_mm": float(gradient[boundary].mean()),
            **{f"radial_{k}": value for k, value in enumerate(radial)}}


def dataset_nodules(root: str | Path, case_ids: Iterable[str]) -> pd.DataFrame:
    """:func:`nodule_measurements` of every nodule of the nnU-Net cases ``case_ids`` in ``root`` (their labelled
    slice), one row each with its ``case_id``."""
    rows = []
    for case_id in case_ids:
        image, label, spacing = read_case(root, case_id)
        rows += [{"case_id": case_id, **m}
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
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if min(len(real), len(other)) < folds:
        return None
    features = np.nan_to_num(np.concatenate([real[list(APPEARANCE_FEATURES)].to_numpy(float),
                                             other[list(APPEARANCE_FEATURES)].to_numpy(float)]))
    target = np.r_[np.zeros(len(real)), np.ones(len(other))]
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    aucs = [roc_auc_score(target, cross_val_predict(model, features, target, method="predict_proba",
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
    vessel contact, and the appearance AUC against the test nodules (:func:`appearance_auc`)."""
    work = Path(work)
    real = dataset_nodules(work / "test", _case_ids(work / "test"))
    out: dict[str, Any] = {"test": _summary(real, real.iloc[:0], seed) | {"appearance_auc": None}}
    for arm, name in datasets.items():
        root = work / "raw" / name
        prefix = ADDED_CASES.get(arm)
        if arm != "real" and prefix is None:
            raise ValueError(f"arm {arm!r} adds no cases to diagnose; allowed: real, {sorted(ADDED_CASES)}")
        chosen = [c for c in _case_ids(root) if prefix is None or c.startswith(prefix)]
        out[arm] = _summary(dataset_nodules(root, chosen), real, seed)
    return out
