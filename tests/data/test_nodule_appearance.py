"""How a nodule's ratings become HU values and an edge profile."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lsdm_aug.data.nodule_appearance import CALCIFIED_HU, render_nodule, texture_mean_hu

SPACING_MM = 0.7


@pytest.fixture
def mask() -> np.ndarray:
    rows, cols = np.indices((48, 48)) - 23.5
    return rows**2 + cols**2 <= 11.0**2


def _render(mask, texture=5, calcification=6, margin=3, seed=0):
    return render_nodule(mask, SPACING_MM, texture=texture, calcification=calcification, margin=margin,
                         rng=np.random.default_rng(seed))


def test_outputs_have_the_mask_shape_and_alpha_in_unit_range(mask):
    hu, alpha = _render(mask)
    assert hu.shape == alpha.shape == mask.shape
    assert hu.dtype == alpha.dtype == np.float32
    assert alpha.min() >= 0 and alpha.max() <= 1
    assert alpha[mask].min() >= 0.85


def test_solid_texture_is_denser_than_ground_glass(mask):
    solid, _ = _render(mask, texture=5)
    ground_glass, _ = _render(mask, texture=1)
    assert solid[mask].mean() - ground_glass[mask].mean() > 400
    assert ground_glass[mask].mean() < -400
    assert abs(solid[mask].mean() - texture_mean_hu(5)) < 50
    assert abs(ground_glass[mask].mean() - texture_mean_hu(1)) < 50


def test_density_rises_with_texture(mask):
    means = [_render(mask, texture=t)[0][mask].mean() for t in (1, 2, 3, 4, 5)]
    assert np.all(np.diff(means) > 0)
    # part-solid: a solid core inside ground glass
    part_solid, _ = _render(mask, texture=3)
    assert (part_solid[mask] > -200).any() and (part_solid[mask] < -400).any()


def test_solid_calcification_is_bone_dense_and_absent_calcification_is_not(mask):
    calcified, _ = _render(mask, texture=5, calcification=3)
    assert (calcified[mask] > 200).mean() > 0.95
    assert abs(calcified[mask].mean() - CALCIFIED_HU) < 50
    plain, _ = _render(mask, texture=5, calcification=6)
    assert not (plain > 200).any()


@pytest.mark.parametrize("calcification", [1, 2, 4, 5])
def test_partial_calcification_patterns_leave_some_tissue(mask, calcification):
    hu, _ = _render(mask, texture=5, calcification=calcification, seed=calcification)
    dense = hu[mask] > 200
    assert 0 < dense.mean() < 1


def test_poorly_defined_margin_spreads_further_than_a_sharp_one(mask):
    _, fuzzy = _render(mask, margin=1)
    _, sharp = _render(mask, margin=5)
    outside = ~mask
    assert fuzzy[outside].sum() > 3 * sharp[outside].sum()
    ring = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask, iterations=2)
    assert fuzzy[ring].mean() > 0.05
    assert sharp[ring].mean() < 0.01
    widths = [(_render(mask, margin=m)[1][outside] > 0.05).sum() for m in (1, 2, 3, 4, 5)]
    assert all(a >= b for a, b in zip(widths, widths[1:]))


def test_median_ratings_are_accepted(mask):
    hu_half, _ = _render(mask, texture=4.5, calcification=5.5, margin=2.5)
    hu_int, _ = _render(mask, texture=5, calcification=6, margin=3)
    np.testing.assert_array_equal(hu_half, hu_int)


def test_same_generator_seed_gives_the_same_nodule(mask):
    a = _render(mask, texture=3, calcification=1, seed=4)
    b = _render(mask, texture=3, calcification=1, seed=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize(("name", "value"), [
    ("texture", 0), ("texture", 7), ("texture", 5.6), ("calcification", 0), ("calcification", 7),
    ("margin", 6), ("margin", float("nan")),
])
def test_invalid_rating_raises_naming_it(mask, name, value):
    ratings = {"texture": 5, "calcification": 6, "margin": 3, name: value}
    with pytest.raises(ValueError) as error:
        render_nodule(mask, SPACING_MM, rng=np.random.default_rng(0), **ratings)
    assert name in str(error.value)
    assert repr(value) in str(error.value)


def test_texture_mean_hu_rejects_invalid_texture():
    with pytest.raises(ValueError, match="texture.*9"):
        texture_mean_hu(9)
    assert texture_mean_hu(5) > texture_mean_hu(3) > texture_mean_hu(1)
