"""The model-quality section that finds where an inserted nodule loses its HU: rings of depth below the outline."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from lsdm_aug.benchmarks import edge_profile as module
from lsdm_aug.benchmarks.edge_profile import depth_ring_means, edge_profile, edge_profile_markdown


def test_rings_are_measured_in_millimetres():
    mask = np.zeros((21, 21), bool)
    mask[2:19, 2:19] = True
    hu = np.where(mask, 0.0, -800.0)
    hu[2:19, 2] = -300.0  # one edge column
    fine = depth_ring_means(hu, mask, 0.5)  # the edge pixels 0.5 mm deep, the next 1.0 mm: both in the first ring
    coarse = depth_ring_means(hu, mask, 0.9)  # the next 1.8 mm deep: the edge alone in the first ring
    assert fine[0] == pytest.approx(-300 * 17 / (64 + 56)) and coarse[0] == pytest.approx(-300 * 17 / 64)
    assert coarse[1] == 0.0 and np.isnan(depth_ring_means(hu, mask, 1.5)[0])  # 1.5 mm: no pixel within 1 mm
    assert np.isnan(depth_ring_means(hu, mask, 0.1)[-1])  # 17 px at 0.1 mm: nothing over 3 mm deep


def test_edge_profile_reinserts_each_test_nodule_in_place(smoke_models, phantom_dataset, monkeypatch):
    from lsdm_aug.data.prepared import PreparedDataset, unit_to_hu
    from lsdm_aug.pipeline import LSDMPipeline

    pipe = LSDMPipeline.from_pretrained(str(smoke_models), device="cpu")
    test = PreparedDataset(phantom_dataset, split="test")
    calls = []
    insert = pipe.insert

    def recording(image, semantic_map, outline, centre, features, **kwargs):
        result = insert(image, semantic_map, outline, centre, features, **kwargs)
        calls.append((image, semantic_map, result.nodule_mask > 0, features))
        return result

    monkeypatch.setattr(pipe, "insert", recording)
    monkeypatch.setattr(module, "MIN_PIXELS", 1)  # the fixture's test nodule is a pixel at 5.4 mm
    profile = edge_profile(pipe, test, count=3, steps=2, seed=0)
    assert profile["nodules"] == len(calls) >= 1
    expected = []
    for row, (image, semantic_map, inserted, features) in zip(
            [r for r in test.features.itertuples() if round(r.calcification) == 6
             and (test[r.case_id]["nodule_mask"] == r.nodule_index).any()], calls):
        case = test[row.case_id]
        mask = case["nodule_mask"] == row.nodule_index
        assert np.array_equal(inserted, mask)  # in place, with its own outline
        assert not (semantic_map[mask] >= 5).any() and (image[mask] == image[mask][0]).all()  # taken out first
        assert features == {"texture": float(round(row.texture))}
        expected.append(depth_ring_means(unit_to_hu(case["image"]), mask, float(case["spacing_mm"])))
    with warnings.catch_warnings():  # a ring no nodule has: nan, as in the profile
        warnings.simplefilter("ignore", RuntimeWarning)
        means = list(np.nanmean(np.array(expected), 0))
    assert [None if np.isnan(m) else pytest.approx(m) for m in means] == profile["rows"]["phantom"]
    assert sum(profile["textures"].values()) == profile["nodules"]
    lines = edge_profile_markdown(profile)
    assert lines[0] == "## Nodule edge (in place, default guidance)"
    assert "| source | 0-1 mm | 1-2 mm | 2-3 mm | over 3 mm |" in lines
    assert any(line.startswith("| inserted |") for line in lines)
    assert edge_profile_markdown({**profile, "nodules": 0}) == []  # nothing measured: no section
