"""Where an inserted nodule departs from the phantom: its HU by depth below its edge.

Each non-calcified phantom test nodule is taken out of its slice (its pixels set to the median of the lung around
it, its labels to lung) and inserted again in place, with its own outline and its own texture requested, at the
model's default guidance. The mean HU of rings 0-1, 1-2, 2-3 and over 3 mm deep below the outline, against the
same rings of the phantom's nodule and of its autoencoder round trip, tell at which stage and at which depth the
inserted nodule's HU is lost: the autoencoder alone keeping the edge while the inserted nodule falls off earlier
puts the loss in the diffusion stage, at the edge.

Example:
    >>> profile = edge_profile(pipe, PreparedDataset("prepared/phantom-512", split="test"), 24, 20, 0)  # doctest: +SKIP
    >>> profile["rows"]["inserted"]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage

from lsdm_aug.config import rating_level
from lsdm_aug.data.prepared import PreparedDataset, unit_to_hu
from lsdm_aug.data.semantic import SemanticLabel
from lsdm_aug.editing import NOT_CALCIFIED
from lsdm_aug.pipeline import LSDMPipeline

__all__ = ["edge_profile", "depth_ring_means", "DEPTH_EDGES_MM", "edge_profile_markdown", "ring_names"]

DEPTH_EDGES_MM = (0.0, 1.0, 2.0, 3.0, np.inf)  # rings below the outline: 0-1, 1-2, 2-3, over 3 mm deep
MIN_PIXELS = 30  # nodules smaller than this have no ring below 1 mm worth reading


def depth_ring_means(hu: np.ndarray, mask: np.ndarray, spacing_mm: float,
                     edges_mm: tuple[float, ...] = DEPTH_EDGES_MM) -> list[float]:
    """Mean HU of ``mask``'s pixels in each ring of depth below its outline (the distance in mm from a pixel's
    centre to the nearest pixel outside, so the outermost pixels lie one pixel deep); nan for an empty ring.

    Example:
        >>> hu = np.full((9, 9), -800.0); mask = np.zeros((9, 9), bool); mask[2:7, 2:7] = True; hu[3:6, 3:6] = 0.0
        >>> depth_ring_means(hu, mask, 0.7, (0.0, 1.0, 2.0, 3.0))  # 0.7 mm deep: the edge; 1.4 and 2.1 mm: inside
        [-800.0, 0.0, 0.0]
    """
    depth = ndimage.distance_transform_edt(mask) * spacing_mm
    rings = [mask & (depth > low) & (depth <= high) for low, high in zip(edges_mm[:-1], edges_mm[1:])]
    return [float(hu[ring].mean()) if ring.any() else float("nan") for ring in rings]


def _taken_out(image: np.ndarray, semantic_map: np.ndarray, mask: np.ndarray, lung: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """The slice with the nodule in ``mask`` taken out: its pixels the median of the lung ring around it, its
    labels lung."""
    ring = ndimage.binary_dilation(mask, iterations=3) & ~mask & lung
    image, semantic_map = image.copy(), semantic_map.copy()
    image[mask] = np.median(image[ring]) if ring.any() else np.median(image[lung])
    semantic_map[mask] = SemanticLabel.LUNG
    return image, semantic_map


def _round_trip(pipe: LSDMPipeline, image: np.ndarray, spacing_mm: float) -> np.ndarray:
    """The slice through what an edit does to it but the diffusion: resampled to the model's spacing, encoded,
    decoded and resampled back."""
    grid = pipe._whole_slice_grid(image.shape, spacing_mm)
    with torch.no_grad():
        decoded = pipe.autoencoder.reconstruct(pipe._tensor(grid.to_model(image, order=1))).clamp(-1, 1)
    (rows, cols), values = grid.to_image(decoded[0, 0].cpu().numpy(), image.shape)
    out = np.array(image, np.float32, copy=True)
    out[rows, cols] = values
    return out


def edge_profile(pipe: LSDMPipeline, test: PreparedDataset, count: int, steps: int, seed: int) -> dict[str, Any]:
    """The rings' mean HU (see the module) over up to ``count`` non-calcified test nodules of at least
    ``MIN_PIXELS`` pixels, for the phantom, its autoencoder round trip (through the edit path's resampling) and the
    nodule inserted in place. A ring no nodule has is None (nan in no report: strict JSON)."""
    rows: dict[str, list[list[float]]] = {"phantom": [], "autoencoder": [], "inserted": []}
    textures = []
    for row in test.features.itertuples():
        if len(textures) >= count:
            break
        if rating_level(getattr(row, "calcification", NOT_CALCIFIED), 6) != NOT_CALCIFIED:
            continue
        case = test[row.case_id]
        mask = case["nodule_mask"] == row.nodule_index
        if mask.sum() < MIN_PIXELS:
            continue
        spacing = float(case["spacing_mm"])
        lung = (case["semantic_map"] == SemanticLabel.LUNG) & (case["nodule_mask"] == 0)
        background, semantic_map = _taken_out(case["image"], case["semantic_map"], mask, lung)
        found_rows, found_cols = np.nonzero(mask)
        top, left = found_rows.min(), found_cols.min()
        outline = mask[top:found_rows.max() + 1, left:found_cols.max() + 1]
        centre = (top + outline.shape[0] / 2, left + outline.shape[1] / 2)
        texture = float(rating_level(row.texture))
        result = pipe.insert(background, semantic_map, outline, centre, {"texture": texture}, spacing_mm=spacing,
                             steps=steps, seed=seed * 7919 + len(textures),
                             conditioning={"calcification": float(NOT_CALCIFIED)})
        inserted = result.nodule_mask > 0
        for name, image, where in (("phantom", case["image"], mask),
                                   ("autoencoder", _round_trip(pipe, case["image"], spacing), mask),
                                   ("inserted", result.image, inserted)):
            rows[name].append(depth_ring_means(unit_to_hu(image), where, spacing))
        textures.append(texture)
    means = {name: _column_means(values) if values else [] for name, values in rows.items()}
    return {"nodules": len(textures), "rings": ring_names(), "rows": means,
            "textures": {str(level): textures.count(float(level)) for level in range(1, 6)}}


def ring_names(edges_mm: tuple[float, ...] = DEPTH_EDGES_MM) -> list[str]:
    """The rings' names, e.g. '0-1 mm' and 'over 3 mm' (plain strings: the report stays strict JSON).

    Example:
        >>> ring_names()
        ['0-1 mm', '1-2 mm', '2-3 mm', 'over 3 mm']
    """
    return [f"{low:g}-{high:g} mm" if np.isfinite(high) else f"over {low:g} mm"
            for low, high in zip(edges_mm[:-1], edges_mm[1:])]


def _column_means(rows: list[list[float]]) -> list[float | None]:
    """Each ring's mean over the nodules that have it (None where none has)."""
    table = np.array(rows, float)
    counts = np.isfinite(table).sum(0)
    sums = np.where(np.isfinite(table), table, 0.0).sum(0)
    return [float(total / n) if n else None for total, n in zip(sums, counts)]


def edge_profile_markdown(profile: dict[str, Any], heading: str = "##") -> list[str]:
    """The section's table: one row per source, one column per ring (nothing when no nodule was measured)."""
    if not profile.get("nodules"):
        return []
    names = profile["rings"]
    textures = ", ".join(f"{n} of texture {level}" for level, n in profile["textures"].items() if n)
    lines = [f"{heading} Nodule edge (in place, default guidance)", "",
             f"{profile['nodules']} non-calcified test nodules ({textures}), each taken out of its slice and inserted "
             "again in place with its own outline and texture: mean HU by depth below the outline, against the same "
             "nodules in the phantom and after the autoencoder alone.", "",
             "| source | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    labels = {"autoencoder": "autoencoder alone (at the model's spacing and back)"}
    lines += [f"| {labels.get(name, name)} | " + " | ".join("n/a" if v is None else f"{v:.0f}" for v in values) + " |"
              for name, values in profile["rows"].items() if values]
    return lines
