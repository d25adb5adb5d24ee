"""How a nodule with given LIDC ratings looks in CT: density by texture, calcification, margin.

Shared by the phantom (which renders nodules from real LIDC outlines) and by evaluation code that
needs to know what HU the phantom renders for each texture level.

Ratings follow LIDC's scales:

* texture 1 ground-glass (non-solid), 3 part-solid, 5 solid;
* calcification 1 popcorn, 2 laminated, 3 solid, 4 non-central, 5 central, 6 absent;
* margin 1 poorly defined ... 5 sharp.

Example:
    >>> import numpy as np
    >>> mask = np.zeros((32, 32), bool); mask[8:24, 8:24] = True
    >>> hu, alpha = render_nodule(mask, spacing_mm=0.7, texture=5, calcification=6, margin=5,
    ...                           rng=np.random.default_rng(0))
    >>> bool(hu[mask].mean() > -100)
    True
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["TEXTURE_SOLID_FRACTION", "SOLID_HU", "GROUND_GLASS_HU", "CALCIFIED_HU", "texture_mean_hu", "render_nodule"]

#: Fraction of the nodule (its inner part, by distance to the edge) that is solid, per texture level.
TEXTURE_SOLID_FRACTION = {1: 0.0, 2: 0.25, 3: 0.5, 4: 0.8, 5: 1.0}
SOLID_HU = 30.0
GROUND_GLASS_HU = -600.0
CALCIFIED_HU = 650.0
#: Sharpness of the edge per margin level, as a Gaussian sigma in mm (1 poorly defined ... 5 sharp).
MARGIN_SIGMA_MM = {1: 1.6, 2: 1.1, 3: 0.7, 4: 0.4, 5: 0.15}


def _level(value: float, low: int, high: int, name: str) -> int:
    if not np.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name} must be a rating in {low}..{high}, got {value!r}")
    return int(np.clip(np.floor(value + 0.5), low, high))


def texture_mean_hu(texture: float) -> float:
    """Expected mean HU inside a non-calcified nodule of this texture (area-weighted estimate).

    The solid core covers about ``TEXTURE_SOLID_FRACTION`` of the area, the rest is ground glass.
    """
    fraction = TEXTURE_SOLID_FRACTION[_level(texture, 1, 5, "texture")]
    return fraction * SOLID_HU + (1 - fraction) * GROUND_GLASS_HU


def _depth(mask: np.ndarray) -> np.ndarray:
    """Distance to the edge, scaled to 1 at the deepest point (0 outside)."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return depth / max(depth.max(), 1e-6)


def _solid_core(depth: np.ndarray, mask: np.ndarray, fraction: float) -> np.ndarray:
    """The deepest ``fraction`` of the nodule's pixels."""
    if fraction <= 0:
        return np.zeros_like(mask)
    if fraction >= 1:
        return mask.copy()
    threshold = np.quantile(depth[mask], 1 - fraction)
    return mask & (depth >= threshold)


def _calcified_part(kind: int, depth: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Where the nodule is calcified, for pylidc's calcification patterns 1..5 (6 = none)."""
    rows, cols = np.indices(mask.shape)
    inside = np.argwhere(mask)
    if kind == 6 or len(inside) == 0:
        return np.zeros_like(mask)
    if kind == 3:  # solid
        return mask.copy()
    if kind == 5:  # central
        return mask & (depth >= 0.55)
    if kind == 2:  # laminated: concentric rings
        return mask & ((np.floor(depth * 5) % 2) == 1)
    if kind == 4:  # non-central: one eccentric blob near the edge
        edge = inside[(depth[mask] > 0.15) & (depth[mask] < 0.45)]
        centre = (edge if len(edge) else inside)[rng.integers(len(edge) if len(edge) else len(inside))]
        radius = max(1.0, 0.35 * np.sqrt(mask.sum() / np.pi))
        return mask & ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2)
    # 1 popcorn: several small irregular blobs
    part = np.zeros_like(mask)
    radius = max(0.8, 0.18 * np.sqrt(mask.sum() / np.pi))
    for centre in inside[rng.integers(len(inside), size=rng.integers(3, 7))]:
        part |= (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= (radius * rng.uniform(0.7, 1.4)) ** 2
    return mask & part


def render_nodule(mask: np.ndarray, spacing_mm: float, texture: float, calcification: float, margin: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """HU values and blending weights of a nodule drawn inside ``mask``.

    Args:
        mask: boolean 2D outline of the nodule (a real LIDC consensus slice).
        spacing_mm: pixel spacing of ``mask``.
        texture: LIDC texture rating 1..5 (median over readers allowed, rounded).
        calcification: LIDC calcification rating 1..6 (6 = absent).
        margin: LIDC margin rating 1..5 (1 poorly defined, 5 sharp).
        rng: random generator for the internal texture and calcification layout.

    Returns:
        ``(hu, alpha)`` of the mask's shape: the nodule's HU and a weight in [0, 1] to blend it over
        the background, ``image = image * (1 - alpha) + hu * alpha``. ``alpha`` is 1 deep inside and
        falls off over the edge with a width set by the margin.
    """
    mask = np.asarray(mask, bool)
    texture_level = _level(texture, 1, 5, "texture")
    calcification_level = _level(calcification, 1, 6, "calcification")
    margin_level = _level(margin, 1, 5, "margin")
    depth = _depth(mask)
    solid = _solid_core(depth, mask, TEXTURE_SOLID_FRACTION[texture_level])
    hu = np.where(solid, SOLID_HU, GROUND_GLASS_HU).astype(np.float32)
    # Ground glass is patchy, solid tissue nearly uniform.
    patchiness = ndimage.gaussian_filter(rng.standard_normal(mask.shape), 1.0)
    hu += np.where(solid, 10.0, 60.0) * patchiness / max(patchiness.std(), 1e-6)
    calcified = _calcified_part(calcification_level, depth, mask, rng)
    hu[calcified] = CALCIFIED_HU + 80.0 * rng.standard_normal(int(calcified.sum()))
    sigma_px = MARGIN_SIGMA_MM[margin_level] / spacing_mm
    alpha = ndimage.gaussian_filter(mask.astype(np.float32), sigma_px) if sigma_px > 0.05 else mask.astype(np.float32)
    alpha = np.clip(np.maximum(alpha, 0.85 * mask), 0.0, 1.0)  # the labelled outline stays dense
    # The blurred rim outside the outline continues the nodule's outer layer: ground glass unless wholly solid.
    rim_hu = SOLID_HU if TEXTURE_SOLID_FRACTION[texture_level] >= 1 else GROUND_GLASS_HU
    hu = np.where(mask, hu, rim_hu).astype(np.float32)
    return hu, alpha.astype(np.float32)
