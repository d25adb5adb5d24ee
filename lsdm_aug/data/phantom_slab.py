"""Slabs of neighbouring axial phantom slices with one 3D vessel tree per patient, for 2.5D detectors.

A single slice cannot tell a 4-8 mm nodule from a crossing vessel of the same size; its neighbours can: a
vessel continues and shifts along its direction from slice to slice, a nodule stays in place and shrinks
towards its ends. :func:`draw_slab` draws ``slices`` consecutive slices of one :class:`ChestPhantom` patient:

* the anatomy of :meth:`ChestPhantom._draw_anatomy` per slice (a smooth function of ``z_fraction``), with
  ``z_mm = z_fraction * LUNG_HEIGHT_MM`` (250 mm from the lung apex, z growing towards the base) and the
  same rib layout on every slice; the 2D per-slice vessels and bronchi are not drawn;
* the vessels of ONE 3D tree per patient (:func:`vessel_tree_3d`, seeded by ``(seed, patient)`` so that all
  slabs of a patient agree), each segment a cylinder cut by the slice plane (:func:`vessel_sections`);
* real LIDC consensus masks resampled to the slab's voxel spacing, centred on the slab's centre slice, each
  layer rendered by :func:`render_nodule` (one texture seed per nodule, so its texture continues in z);
* blur and noise as :meth:`ChestPhantom._acquire`, the noise independent per slice.

Example:
    >>> from lsdm_aug.data.phantom import ChestPhantom, PhantomConfig
    >>> slab = draw_slab(ChestPhantom(PhantomConfig(size=64)), index=0, seed=0, slices=3)
    >>> slab.hu.shape, slab.nodule_mask.dtype.name, slab.slice_thickness_mm
    ((3, 64, 64), 'uint8', 1.25)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from lsdm_aug.data.lidc import RATING_NAMES, NoduleMaskBank, resample_mask
from lsdm_aug.data.nodule_appearance import render_nodule
from lsdm_aug.data.phantom import BLOOD_HU, ChestPhantom, _Anatomy, free_site
from lsdm_aug.data.semantic import malignancy_label

__all__ = ["PhantomSlab", "draw_slab", "vessel_tree_3d", "vessel_sections", "nodule_layers", "LUNG_HEIGHT_MM", "THICKNESS_RANGE_MM",
           "MAX_SLICES"]

LUNG_HEIGHT_MM = 250.0
THICKNESS_RANGE_MM = (0.6, 3.0)
MAX_SLICES = 15
HILUM_Z_FRACTION = 0.4  # the level of the main bronchi in the 2D phantom
TRUNKS_PER_HILUM = (24, 33)  # the 2D tree's 6-8 fan out in one plane; a volume needs more to fill it alike
MAX_ELEVATION = math.radians(60.0)
COARSE_SIZE = 64  # the lung the tree grows in: 64 px every 10 mm along z
COARSE_STEP_MM = 10.0


@dataclass
class PhantomSlab:
    """``k`` consecutive axial slices of one phantom patient and their ground truth.

    Attributes:
        hu: (k, H, W) float32 Hounsfield units, slice 0 nearest the apex.
        lung_mask: (k, H, W) bool lung fields.
        nodule_mask: (k, H, W) uint8, 0 outside nodules, j inside ``nodules[j - 1]`` on every slice it spans.
        nodules: dicts as in ``PhantomSlice.nodules`` (centre row/col and area on the centre slice), plus
            ``centre_slice`` (index in the slab, always ``k // 2``) and ``depth_slices`` (the nodule's depth in
            slices; more than ``k`` means the slab shows only its middle).
        spacing_mm: in-plane pixel spacing.
        slice_thickness_mm: distance between neighbouring slices (also their thickness).
        patient_id: phantom patient.
        z_mm: (k,) position of each slice below the lung apex (``z_fraction * LUNG_HEIGHT_MM``).
    """

    hu: np.ndarray
    lung_mask: np.ndarray
    nodule_mask: np.ndarray
    nodules: list[dict]
    spacing_mm: float
    slice_thickness_mm: float
    patient_id: str
    z_mm: np.ndarray


def draw_slab(phantom: ChestPhantom, index: int, seed: int = 0, slices: int = 3,
              thickness_mm: float = 1.25) -> PhantomSlab:
    """The slab of ``slices`` slices centred on slice ``index`` of the phantom dataset seeded with ``seed``.

    Args:
        phantom: the :class:`ChestPhantom` (its config: size, nodule-free fraction, nodules per slice, ...).
        index: as in :meth:`ChestPhantom.slice`: patient ``index // slices_per_patient``, centred on that
            patient's slice position ``index % slices_per_patient``.
        seed: dataset seed; the slab is the same for the same ``(index, seed)``.
        slices: odd number of slices, 1..:data:`MAX_SLICES` (odd: every nodule is centred on the middle one).
        thickness_mm: slice spacing and thickness in mm, within :data:`THICKNESS_RANGE_MM` (LIDC-like thin
            slices by default).
    """
    _check_slab(index, slices, thickness_mm)
    patient = index // phantom.config.slices_per_patient
    anatomy = phantom._anatomy(np.random.default_rng([seed, patient, 1]))
    spacing = anatomy.fov_mm / phantom.config.size
    centre_t = float(anatomy.slice_positions[index % phantom.config.slices_per_patient])
    z_mm = centre_t * LUNG_HEIGHT_MM + (np.arange(slices) - slices // 2) * thickness_mm
    tree = _patient_tree(phantom, anatomy, seed, patient)
    hu, lung = _draw_slices(phantom, anatomy, tree, z_mm, spacing, seed, patient)
    nodule_mask = np.zeros(hu.shape, np.uint8)
    rng = np.random.default_rng([seed, index, 6])
    nodules: list[dict] = []
    if rng.random() >= phantom.config.nodule_free_fraction:
        wanted = int(rng.integers(1, phantom.config.max_nodules_per_slice + 1))
        nodules = _place_nodules(phantom, hu, lung, nodule_mask, wanted, (spacing, thickness_mm), rng)
    hu = np.stack([phantom._acquire(hu[j], anatomy, spacing, np.random.default_rng([seed, index, 7, j]))
                   for j in range(slices)])
    return PhantomSlab(hu=hu, lung_mask=lung, nodule_mask=nodule_mask, nodules=nodules, spacing_mm=spacing,
                       slice_thickness_mm=float(thickness_mm), patient_id=phantom.patient_id(index), z_mm=z_mm)


def _check_slab(index: int, slices: int, thickness_mm: float) -> None:
    """Errors naming the value and what is allowed."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index!r}")
    if not (isinstance(slices, int | np.integer) and 1 <= slices <= MAX_SLICES and slices % 2 == 1):
        raise ValueError(f"slices must be an odd integer in 1..{MAX_SLICES}, got {slices!r}")
    low, high = THICKNESS_RANGE_MM
    if not low <= thickness_mm <= high:
        raise ValueError(f"thickness_mm must be in [{low}, {high}] mm, got {thickness_mm!r}")


# ---- vessels -----------------------------------------------------------------------------------------------
def vessel_tree_3d(hila: Sequence[tuple[float, float, float]], in_lung: Callable[[float, float, float], bool],
                   rng: np.random.Generator, min_radius_mm: float = 0.4,
                   trunks_per_hilum: tuple[int, int] = TRUNKS_PER_HILUM) -> np.ndarray:
    """Segments of a 3D pulmonary vessel tree grown from each hilum, in mm.

    The branching rules of :func:`lsdm_aug.data.phantom.vessel_tree` in 3D: each hilum sends trunks (radius
    2-4.5 mm) fanning outwards in plane (+-1.7 rad about the outward direction) and up or down (elevation
    uniform over the band of directions within +-60 degrees); every segment is 5-10 radii long and splits
    into a major (0.7-0.9 of the radius) and a minor branch (0.45-0.75) turning 15-45 degrees apart, in a
    plane of random orientation about the parent, until the radius falls below ``min_radius_mm`` or the
    segment ends outside the lung.

    Args:
        hila: (x, y, z) of each hilum in mm.
        in_lung: callable ``(x_mm, y_mm, z_mm) -> bool``.
        rng: random generator.
        min_radius_mm: smallest vessel radius drawn.
        trunks_per_hilum: range (low, high exclusive) of the number of trunks per hilum.

    Returns:
        (N, 7) float64: start x, y, z, end x, y, z, radius per segment.

    Example:
        >>> tree = vessel_tree_3d([(-40.0, 0.0, 100.0)], lambda x, y, z: abs(x) < 150 and 0 < z < 250,
        ...                       np.random.default_rng(0))
        >>> tree.shape[1], bool(np.ptp(tree[:, 2]) > 50), bool(tree[:, 6].max() > 2 > tree[:, 6].min())
        (7, True, True)
    """
    stack = []
    for hx, hy, hz in hila:
        count = int(rng.integers(*trunks_per_hilum))
        azimuth = (0.0 if hx > 0 else math.pi) + np.linspace(-1.7, 1.7, count) + rng.uniform(-0.2, 0.2, count)
        elevation = np.arcsin(rng.uniform(-1, 1, count) * math.sin(MAX_ELEVATION))
        for az, el in zip(azimuth, elevation):
            direction = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
            stack.append((np.array([hx, hy, hz], float), direction, rng.uniform(2.0, 4.5), 0))
    segments = []
    while stack:
        start, direction, radius, depth = stack.pop()
        end = start + radius * rng.uniform(5.0, 10.0) * direction
        if depth > 0 and not in_lung(*end):
            continue
        segments.append((*start, *end, radius))
        if depth >= 14:
            continue
        turn, side = rng.uniform(0.26, 0.79), _perpendicular(direction, rng)
        for share, bend in ((rng.uniform(0.7, 0.9), -0.4 * turn), (rng.uniform(0.45, 0.75), turn)):
            if radius * share >= min_radius_mm:
                stack.append((end, direction * math.cos(bend) + side * math.sin(bend), radius * share, depth + 1))
    return np.array(segments, np.float64).reshape(-1, 7)


def _perpendicular(direction: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at right angles to ``direction`` (unit), at a random angle about it."""
    helper = np.array([1.0, 0.0, 0.0]) if abs(direction[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    first = np.cross(direction, helper)
    first /= np.linalg.norm(first)
    angle = rng.uniform(0, 2 * math.pi)
    return first * math.cos(angle) + np.cross(direction, first) * math.sin(angle)


def vessel_sections(segments: np.ndarray, z_mm: float) -> np.ndarray:
    """Ellipses ``(cx, cy, a, b, angle)`` in mm where the plane ``z = z_mm`` cuts the segments' cylinders.

    A cylinder of radius r whose axis makes the angle theta with z cuts the plane in an ellipse of minor
    semi-axis r and major r / |cos theta| along the axis' projection, cut short where the segment (extended by
    r at each end, so branches join) ends; the minor axis is then the widest chord left. Segments the plane
    misses are left out.

    Args:
        segments: (N, 7) as returned by :func:`vessel_tree_3d`.
        z_mm: the plane's position.

    Example:
        >>> oblique = np.array([[-10.0, 0.0, -10.0, 10.0, 0.0, 10.0, 1.0]])  # 45 degrees to z, in the x-z plane
        >>> np.round(vessel_sections(oblique, 0.0), 3).tolist()
        [[0.0, 0.0, 1.414, 1.0, 0.0]]
    """
    start, radius = segments[:, :3], segments[:, 6]
    axis = segments[:, 3:6] - start
    length = np.linalg.norm(axis, axis=1)
    d = axis / np.maximum(length, 1e-9)[:, None]
    h = np.maximum(np.hypot(d[:, 0], d[:, 1]), 1e-9)  # in-plane share of the direction
    c = np.where(d[:, 2] < 0, -1.0, 1.0) * np.maximum(np.abs(d[:, 2]), 1e-9)
    e = z_mm - start[:, 2]
    # in-plane point start + t u + q v is in the cylinder iff q^2 + (c t - e h)^2 <= r^2, at axis s = t h + e c
    t0, half = e * h / c, radius / np.abs(c)
    low = np.maximum(t0 - half, (-radius - e * c) / h)
    high = np.minimum(t0 + half, (length + radius - e * c) / h)
    near = np.clip(t0, low, high)
    minor = np.sqrt(np.maximum(radius**2 - (c * near - e * h) ** 2, 0.0))
    hit = (high > low) & (minor > 1e-3)
    middle = (low + high) / 2
    ux, uy = d[:, 0] / h, d[:, 1] / h
    sections = np.stack([start[:, 0] + middle * ux, start[:, 1] + middle * uy, (high - low) / 2, minor,
                         np.arctan2(d[:, 1], d[:, 0])], axis=1)
    return sections[hit]


def _patient_tree(phantom: ChestPhantom, anatomy: _Anatomy, seed: int, patient: int) -> np.ndarray:
    """The patient's one vessel tree, grown in its lungs drawn coarsely every 10 mm along z."""
    coarse = _VesselFreeAnatomy(phantom, size=COARSE_SIZE)
    spacing = anatomy.fov_mm / COARSE_SIZE
    levels = np.arange(0.0, LUNG_HEIGHT_MM + COARSE_STEP_MM / 2, COARSE_STEP_MM)
    lungs = np.stack([coarse._draw_anatomy(anatomy, float(z / LUNG_HEIGHT_MM), spacing,
                                           np.random.default_rng([seed, patient, 5]))[1] for z in levels])
    centre = (COARSE_SIZE - 1) / 2

    def in_lung(x: float, y: float, z: float) -> bool:
        level, row, col = round(z / COARSE_STEP_MM), round(y / spacing + centre), round(x / spacing + centre)
        return 0 <= level < len(levels) and 0 <= row < COARSE_SIZE and 0 <= col < COARSE_SIZE and \
            bool(lungs[level, row, col])

    hilum_y, hilum_z = anatomy.body_cy - 0.3 * anatomy.muscle_mm, HILUM_Z_FRACTION * LUNG_HEIGHT_MM
    return vessel_tree_3d([(-40.0, hilum_y, hilum_z), (40.0, hilum_y, hilum_z)], in_lung,
                          np.random.default_rng([seed, patient, 4]))


class _VesselFreeAnatomy(ChestPhantom):
    """The phantom's anatomy without its 2D per-slice vessels and bronchi (a slab draws its 3D tree instead)."""

    def __init__(self, phantom: ChestPhantom, size: int | None = None) -> None:
        vars(self).update(vars(phantom))  # shares the phantom's config, tables and grids
        if size is not None:
            self.config = replace(phantom.config, size=size, spacing="fov")
            self._rows, self._cols = np.indices((size, size), dtype=np.float32)

    def _draw_lung_structures(self, *args) -> None:
        """Nothing: the slab's vessels come from the patient's 3D tree."""


def _draw_slices(phantom: ChestPhantom, anatomy: _Anatomy, tree: np.ndarray, z_mm: np.ndarray, spacing: float,
                 seed: int, patient: int) -> tuple[np.ndarray, np.ndarray]:
    """Anatomy and vessels of each slice, before nodules and acquisition: (k, H, W) HU and lung masks."""
    view = _VesselFreeAnatomy(phantom)
    x, y = phantom._mm_grid(spacing)
    hus, lungs = [], []
    for z in z_mm:
        t = float(np.clip(z / LUNG_HEIGHT_MM, 0.0, 1.0))
        hu, lung = view._draw_anatomy(anatomy, t, spacing, np.random.default_rng([seed, patient, 5]))
        for ellipse in vessel_sections(tree, float(z)):
            ChestPhantom._paint_local(hu, lung, x, y, tuple(ellipse), BLOOD_HU)
        hus.append(hu)
        lungs.append(lung)
    return np.stack(hus), np.stack(lungs)


# ---- nodules -----------------------------------------------------------------------------------------------
def nodule_layers(bank: NoduleMaskBank, nodule_id: str, spacing_mm: float, thickness_mm: float) -> np.ndarray:
    """A nodule's consensus mask resampled to the slab's voxels, (depth, H, W), without empty end layers.

    Example:
        >>> bank = NoduleMaskBank.default()
        >>> nodule_layers(bank, bank.nodule_ids[0], 0.7, 1.25).ndim
        3
    """
    i = bank.nodule_ids.index(nodule_id)
    native = (float(bank.pixel_spacing_mm[i]),) * 2 + (float(bank.slice_spacing_mm[i]),)
    layers = np.moveaxis(resample_mask(bank.mask_3d(nodule_id), native, (spacing_mm, spacing_mm, thickness_mm)), 2, 0)
    filled = np.flatnonzero(layers.any(axis=(1, 2)))
    return layers[filled[0]:filled[-1] + 1] if len(filled) else layers[:0]


def _place_nodules(phantom: ChestPhantom, hu: np.ndarray, lung: np.ndarray, nodule_mask: np.ndarray, wanted: int,
                   voxel_mm: tuple[float, float], rng: np.random.Generator) -> list[dict]:
    """Up to ``wanted`` nodules centred on the slab's middle slice, each inside the lung on every slice it spans."""
    spacing, thickness = voxel_mm
    k, centre = hu.shape[0], hu.shape[0] // 2
    taken = np.zeros(hu.shape, bool)
    nodules: list[dict] = []
    for _ in range(wanted * 8):
        if len(nodules) == wanted:
            break
        row = phantom.sample_nodule(rng)
        layers = nodule_layers(phantom.mask_bank, row.nodule_id, spacing, thickness)
        if len(layers) == 0 or not layers[len(layers) // 2].any():
            continue
        layers = layers[:, :, ::-1] if rng.random() < 0.5 else layers
        first = centre - len(layers) // 2
        span = slice(max(first, 0), min(first + len(layers), k))
        shown = layers[span.start - first:span.stop - first]
        site = free_site(lung[span].all(axis=0) & ~taken[span].any(axis=0), shown.any(axis=0), spacing, rng)
        if site is None:
            continue
        placed = np.zeros((len(shown),) + hu.shape[1:], bool)
        placed[:, site[0]:site[0] + layers.shape[1], site[1]:site[1] + layers.shape[2]] = shown
        _paint_nodule(hu[span], placed, row, spacing, int(rng.integers(2**31)))
        nodule_mask[span][placed] = len(nodules) + 1
        taken[span] |= ndimage.binary_dilation(placed, np.ones((1, 5, 5), bool))
        nodules.append(_nodule_record(row, placed[centre - span.start], centre, len(layers)))
    return nodules


def _paint_nodule(hu: np.ndarray, placed: np.ndarray, row, spacing: float, texture_seed: int) -> None:
    """Blend each layer of ``placed`` into its slice of ``hu`` as ``_draw_nodule`` does, with one window and one
    texture seed for all layers so that the texture continues from slice to slice."""
    pad = 6
    rows, cols = np.nonzero(placed.any(axis=0))
    window = (slice(max(rows.min() - pad, 0), rows.max() + pad + 1), slice(max(cols.min() - pad, 0), cols.max() + pad + 1))
    for image, layer in zip(hu, placed):
        if layer.any():
            nodule_hu, alpha = render_nodule(layer[window], spacing, row.texture, row.calcification, row.margin,
                                             np.random.default_rng(texture_seed))
            image[window] = image[window] * (1 - alpha) + nodule_hu * alpha


def _nodule_record(row, centre_layer: np.ndarray, centre_slice: int, depth: int) -> dict:
    """The ``PhantomSlice.nodules`` record, measured on the centre slice, with ``centre_slice`` and ``depth_slices``."""
    rows, cols = np.nonzero(centre_layer)
    record = {"nodule_id": row.nodule_id, **{name: float(row[name]) for name in RATING_NAMES},
              **{f"{name}_readers": str(row[f"{name}_readers"]) for name in RATING_NAMES}}
    record.update(malignancy_class=malignancy_label(row.malignancy), centre_row=float(rows.mean()),
                  centre_col=float(cols.mean()), diameter_mm=float(row.diameter_mm), area_px=int(centre_layer.sum()),
                  centre_slice=centre_slice, depth_slices=depth)
    return record
