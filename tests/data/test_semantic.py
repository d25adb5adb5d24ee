"""The 8-label semantic map and its lung segmentation (K-means + morphology, not a threshold)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lsdm_aug.data.phantom import ChestPhantom, PhantomConfig
from lsdm_aug.data.semantic import SemanticLabel, lung_mask_from_hu, malignancy_label, semantic_map_from_hu


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom_slices_128():
    """54 slices at 128 px: three seeds, nine patients, apex to base."""
    phantom = ChestPhantom(PhantomConfig(size=128, slices_per_patient=6))
    return [phantom.slice(index, seed) for seed in (0, 1, 2) for index in range(18)]


def _chest(trachea_gap_mm: float | None = None, spacing_mm: float = 1.4, size: int = 220):
    """A synthetic slice: air, a soft-tissue body, two lungs with vessels, a trachea in the mediastinum.

    The lungs' inner edges are 30 mm either side of the midline; the trachea (8 mm radius) is
    centred, or ``trachea_gap_mm`` from the right lung (the right paratracheal stripe, 1-4 mm in adults).
    """
    centre = (size - 1) / 2
    rows, cols = np.indices((size, size))
    y, x = (rows - centre) * spacing_mm, (cols - centre) * spacing_mm
    hu = np.full((size, size), -1000.0, np.float32)
    body = (x / 135) ** 2 + (y / 90) ** 2 <= 1
    hu[body] = 40.0
    lungs = np.zeros_like(body)
    for side in (-1, 1):
        lungs |= ((x - side * 70) / 40) ** 2 + (y / 55) ** 2 <= 1
    hu[lungs] = -850.0
    vessels = np.zeros_like(body)
    for side in (-1, 1):
        for dy in (-30, 0, 25):
            vessels |= (x - side * 70 - 8) ** 2 + (y - dy) ** 2 <= 3.0**2
    vessels &= lungs
    hu[vessels] = 40.0
    trachea_x = 0.0 if trachea_gap_mm is None else -30.0 + trachea_gap_mm + 8.0
    trachea = (x - trachea_x) ** 2 + (y + 20) ** 2 <= 8.0**2
    hu[trachea] = -1000.0
    noise = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal(hu.shape), 1.0)
    hu += (15.0 * noise / noise.std()).astype(np.float32)
    return hu, body, lungs, vessels, trachea


def test_lung_mask_matches_the_phantom_lungs(phantom_slices_128):
    scores = [_dice(lung_mask_from_hu(ct.hu, ct.spacing_mm), ct.lung_mask) for ct in phantom_slices_128]
    assert len(scores) >= 50
    assert np.mean(scores) >= 0.9
    assert min(scores) >= 0.8, sorted(scores)[:5]


def test_lung_mask_is_not_a_threshold():
    hu, body, lungs, vessels, trachea = _chest()
    lung = lung_mask_from_hu(hu, spacing_mm=1.4)
    assert lung.dtype == np.bool_
    assert _dice(lung, lungs) > 0.95
    assert not (lung & ~body).any()  # air around the patient
    assert not (lung & trachea).any()  # air inside the body that is not lung
    assert lung[vessels].all()  # vessels inside the lung field are lung
    # a threshold gets all three wrong
    threshold = hu < -500
    assert (threshold & ~body).any() and (threshold & trachea).any() and not threshold[vessels].any()


def test_trachea_next_to_the_lung_is_not_lung():
    """Real tracheas often lie a few mm from the right lung; that must not make them lung."""
    hu, body, lungs, _, trachea = _chest(trachea_gap_mm=4.0)
    lung = lung_mask_from_hu(hu, spacing_mm=1.4)
    assert _dice(lung, lungs) > 0.95
    assert not (lung & trachea).any()
    assert (lung & body & ~lungs).sum() * 1.4**2 < 20  # no mediastinum swallowed either


def test_phantom_vessels_are_lung_and_outside_air_is_not(phantom_slices_128):
    enclosed_vessel_px = labelled_px = 0
    for ct in phantom_slices_128[::3]:
        lung = lung_mask_from_hu(ct.hu, ct.spacing_mm)
        # dense blobs (vessel cross-sections, nodules) wholly inside the lung field
        labels, count = ndimage.label((ct.hu > -300) & ct.lung_mask)
        for k in range(1, count + 1):
            blob = labels == k
            if not (ndimage.binary_dilation(blob, iterations=2) & ~ct.lung_mask).any():
                enclosed_vessel_px += int(blob.sum())
                labelled_px += int((lung & blob).sum())
        # air around the patient: the very low-density region touching the border
        labels, _ = ndimage.label(ct.hu < -900)
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        outside_air = np.isin(labels, border[border > 0])
        assert outside_air.sum() > 0.1 * ct.hu.size
        assert not (lung & outside_air).any()
    assert enclosed_vessel_px > 500
    assert labelled_px / enclosed_vessel_px > 0.98


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_empty_or_uniform_slices_give_no_lung():
    assert not lung_mask_from_hu(np.full((64, 64), -1000.0), 1.0).any()
    assert not lung_mask_from_hu(np.full((64, 64), 40.0), 1.0).any()


def test_lung_mask_rejects_a_volume():
    with pytest.raises(ValueError, match="2D"):
        lung_mask_from_hu(np.zeros((4, 32, 32)), 1.0)


def _blocks():
    """Air all round; inside, a body of three density bands."""
    hu = np.full((96, 96), -1000.0, np.float32)
    hu[16:80, 16:40] = -200.0
    hu[16:80, 40:56] = 100.0
    hu[16:80, 56:80] = 500.0
    return hu


def test_semantic_map_labels_density_bands():
    hu = _blocks()
    semantic_map = semantic_map_from_hu(hu, spacing_mm=1.0)
    assert semantic_map.dtype == np.uint8 and semantic_map.shape == hu.shape
    assert (semantic_map[20:76, 20:36] == SemanticLabel.BODY).all()
    assert (semantic_map[20:76, 42:54] == SemanticLabel.SOFT_TISSUE).all()
    assert (semantic_map[20:76, 60:76] == SemanticLabel.HIGH_DENSE).all()
    assert (semantic_map[:10] == SemanticLabel.BACKGROUND).all()
    assert [int(SemanticLabel(v)) for v in (1, 2, 3)] == [1, 2, 3]


@pytest.mark.parametrize(("hu_value", "label"), [(-1000, 0), (-400, 1), (-200, 1), (-1, 1), (0, 2), (100, 2),
                                                  (199, 2), (200, 3), (500, 3), (1500, 3)])
def test_semantic_map_thresholds(hu_value, label):
    hu = _blocks()
    hu[30:60, 30:60] = hu_value
    semantic_map = semantic_map_from_hu(hu, spacing_mm=1.0, lung_mask=np.zeros(hu.shape, bool))
    assert (semantic_map[35:55, 35:55] == label).all()


def test_semantic_map_nodules_by_malignancy():
    hu = _blocks()
    nodule_mask = np.zeros(hu.shape, np.uint8)
    nodule_mask[20:24, 20:24] = 1
    nodule_mask[30:34, 20:24] = 2
    nodule_mask[40:44, 20:24] = 3
    nodule_mask[50:54, 20:24] = 4
    nodule_mask[60:64, 20:24] = 5
    semantic_map = semantic_map_from_hu(hu, nodule_mask, [1, 2.5, 3, 3.5, 5], spacing_mm=1.0)
    assert [int(semantic_map[r + 1, 21]) for r in (20, 30, 40, 50, 60)] == [5, 5, 6, 7, 7]
    assert (semantic_map[nodule_mask == 3] == SemanticLabel.NODULE_INDETERMINATE).all()
    # the rest keeps its tissue label
    assert (semantic_map[20:76, 30:36] == SemanticLabel.BODY).all()


def test_semantic_map_of_a_phantom_slice(phantom_slices_128):
    ct = next(ct for ct in phantom_slices_128 if ct.nodules)
    malignancies = [n["malignancy"] for n in ct.nodules]
    semantic_map = semantic_map_from_hu(ct.hu, ct.nodule_mask, malignancies, spacing_mm=ct.spacing_mm,
                                        lung_mask=ct.lung_mask)
    assert set(np.unique(semantic_map)) >= {0, 1, 2, 3, 4}
    assert semantic_map.max() <= 7
    for k, nodule in enumerate(ct.nodules, start=1):
        assert (semantic_map[ct.nodule_mask == k] == nodule["malignancy_class"]).all()
    assert (semantic_map[ct.lung_mask & (ct.nodule_mask == 0)] == SemanticLabel.LUNG).all()


def test_nodule_mask_and_malignancies_must_agree():
    hu = _blocks()
    nodule_mask = np.zeros(hu.shape, np.uint8)
    nodule_mask[20:24, 20:24] = 1
    nodule_mask[30:34, 20:24] = 3
    with pytest.raises(ValueError, match="3"):
        semantic_map_from_hu(hu, nodule_mask, [2, 4], spacing_mm=1.0)
    with pytest.raises(ValueError):
        semantic_map_from_hu(hu, nodule_mask, [], spacing_mm=1.0)


@pytest.mark.parametrize(("malignancy", "label"), [(1, 5), (2.5, 5), (3, 6), (3.5, 7), (5, 7)])
def test_malignancy_label(malignancy, label):
    assert malignancy_label(malignancy) == label


@pytest.mark.parametrize("malignancy", [0, 5.5, float("nan")])
def test_malignancy_label_rejects_out_of_range(malignancy):
    with pytest.raises(ValueError, match="malignancy"):
        malignancy_label(malignancy)


def test_patches_find_their_lung_and_only_their_lung():
    from lsdm_aug.data.semantic import lung_mask_from_hu

    rng = np.random.default_rng(1)
    tissue = rng.normal(40, 20, (96, 96))
    assert not lung_mask_from_hu(tissue, 0.7).any()  # chest wall only: one tissue, not split down its noise
    half = tissue.copy()
    half[:, 48:] = rng.normal(-850, 25, (96, 48))  # chest wall on the left, lung touching three borders
    lung = lung_mask_from_hu(half, 0.7)
    assert lung[:, 52:].mean() > 0.95 and not lung[:, :44].any()
