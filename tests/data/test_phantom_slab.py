"""Slabs of neighbouring phantom slices: the 3D vessel tree, its cross-sections, and nodules spanning slices."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lsdm_aug.data.lidc import NoduleMaskBank
from lsdm_aug.data.phantom import ChestPhantom, PhantomConfig
from lsdm_aug.data.phantom_slab import draw_slab, nodule_layers, vessel_sections, vessel_tree_3d


@pytest.fixture(scope="module")
def phantom_256():
    return ChestPhantom(PhantomConfig(size=256, nodule_free_fraction=0.0, max_nodules_per_slice=2))


@pytest.fixture(scope="module")
def slabs_256(phantom_256):
    return [draw_slab(phantom_256, index=i, seed=5, slices=5, thickness_mm=1.5) for i in range(6)]


def test_a_cylinder_along_z_cuts_a_circle_and_a_plane_past_its_end_cuts_nothing():
    upright = np.array([[3.0, -2.0, 0.0, 3.0, -2.0, 20.0, 1.5]])
    (section,) = vessel_sections(upright, 10.0)
    assert section[:4] == pytest.approx([3.0, -2.0, 1.5, 1.5])
    assert len(vessel_sections(upright, 25.0)) == 0  # beyond the end extended by one radius
    assert len(vessel_sections(upright, 21.0)) == 1  # within one radius of the end: branches join


def test_an_oblique_cylinder_cuts_an_ellipse_stretched_along_its_direction():
    angle = math.radians(60.0)  # from z
    direction = np.array([0.0, math.sin(angle), math.cos(angle)])
    segment = np.concatenate([-30 * direction, 30 * direction, [2.0]])[None]
    (section,) = vessel_sections(segment, 0.0)
    assert section[2] == pytest.approx(2.0 / math.cos(angle))
    assert section[3] == pytest.approx(2.0)
    assert section[4] == pytest.approx(math.pi / 2)  # its major axis along y


def test_the_3d_tree_branches_thinner_and_stays_in_the_lung():
    def in_lung(x, y, z):
        return x * x + y * y < 120**2 and 0 < z < 250

    tree = vessel_tree_3d([(-40.0, 0.0, 100.0), (40.0, 0.0, 100.0)], in_lung, np.random.default_rng(3),
                          min_radius_mm=0.5)
    radius = tree[:, 6]
    assert radius.min() >= 0.5 and radius.max() <= 4.5
    assert np.mean(radius < 1.0) > 0.3  # mostly small peripheral branches, as in a lung
    assert all(in_lung(*end) for end in tree[radius < 2.0, 3:6])  # branches that leave the lung are cut
    assert np.ptp(tree[:, 2]) > 60  # it fills the lung up and down, not one plane


def test_a_slab_is_reproducible_and_its_neighbouring_slices_are_alike(phantom_256, slabs_256):
    again = draw_slab(phantom_256, index=2, seed=5, slices=5, thickness_mm=1.5)
    np.testing.assert_array_equal(again.hu, slabs_256[2].hu)
    slab = slabs_256[2]
    lung = slab.lung_mask.all(axis=0)
    neighbours = np.corrcoef(slab.hu[2][lung], slab.hu[3][lung])[0, 1]
    far = np.corrcoef(slab.hu[2][lung], slabs_256[5].hu[2][lung])[0, 1]
    assert neighbours > 0.5 > far
    assert slab.z_mm.tolist() == pytest.approx((slab.z_mm[2] + np.arange(-2, 3) * 1.5).tolist())


def test_slab_nodules_are_centred_on_the_middle_slice_and_lie_in_the_lung(slabs_256):
    nodules = [(slab, k, record) for slab in slabs_256 for k, record in enumerate(slab.nodules, start=1)]
    assert len(nodules) >= 6
    for slab, k, record in nodules:
        layers = (slab.nodule_mask == k).any(axis=(1, 2))
        assert layers[record["centre_slice"]] and record["centre_slice"] == 2
        shown = np.flatnonzero(layers)
        assert np.array_equal(shown, np.arange(shown[0], shown[-1] + 1))  # no gaps along z
        assert len(shown) == min(record["depth_slices"], 5) or len(shown) < record["depth_slices"]
        assert (slab.nodule_mask == k).sum() > 0 and slab.lung_mask[slab.nodule_mask == k].all()
        rows, cols = np.nonzero(slab.nodule_mask[2] == k)
        assert rows.mean() == pytest.approx(record["centre_row"]) and len(rows) == record["area_px"]


def test_a_nodule_keeps_its_depth_in_mm_at_any_slice_thickness():
    bank = NoduleMaskBank.default()
    depth_mm = bank.shapes[:, 2] * bank.slice_spacing_mm
    nodule = bank.nodule_ids[int(np.argsort(depth_mm)[len(depth_mm) * 9 // 10])]  # a large one: 90th percentile
    thin, thick = (len(nodule_layers(bank, nodule, 0.7, t)) for t in (1.0, 2.5))
    assert thin > thick > 2
    assert thin * 1.0 == pytest.approx(thick * 2.5, abs=2.5)  # within a thick slice


@pytest.mark.parametrize(("kwargs", "message"), [({"slices": 4}, "odd integer"), ({"slices": 17}, "odd integer"),
                                                 ({"thickness_mm": 5.0}, "thickness_mm"),
                                                 ({"index": -1}, "index must be >= 0")])
def test_bad_slab_requests_name_the_value(phantom_256, kwargs, message):
    with pytest.raises(ValueError, match=message):
        draw_slab(phantom_256, **({"index": 0} | kwargs))
