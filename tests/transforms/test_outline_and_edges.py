"""Outlines chosen by every requested shape feature; the 3D edge slices; a slice with no lung is a recorded skip."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from lsdm_aug.data.prepared import PreparedDataset, unit_to_hu
from lsdm_aug.data.semantic import lung_mask_from_hu, semantic_map_from_hu
from lsdm_aug.transforms.core import NoduleSynthesizer, choose_outline, usable_nodule_table


def _level(value: float) -> int:
    return int(np.clip(np.floor(value + 0.5), 1, 5))


@pytest.mark.parametrize("features", [{"spiculation": 5}, {"lobulation": 5, "malignancy": 4},
                                      {"malignancy": 1, "lobulation": 1, "spiculation": 1}])
def test_outlines_match_every_requested_shape_feature(features):
    table = usable_nodule_table().set_index("nodule_id")
    rng = np.random.RandomState(0)
    chosen = [choose_outline(usable_nodule_table(), features, None, rng) for _ in range(40)]
    assert all(distance == 0.0 for _, distance in chosen)
    for nodule_id, _ in chosen:
        assert all(_level(table.loc[nodule_id, name]) == value for name, value in features.items())
    assert len({nodule_id for nodule_id, _ in chosen}) > 5  # still a draw among the matches


def test_without_an_exact_match_the_nearest_outline_is_chosen_and_its_distance_recorded():
    table = usable_nodule_table()
    levels = {f: np.clip(np.floor(table[f] + 0.5), 1, 5) for f in ("malignancy", "lobulation", "spiculation")}
    request = {"malignancy": 1, "lobulation": 4, "spiculation": 5}
    exact = (levels["malignancy"] == 1) & (levels["lobulation"] == 4) & (levels["spiculation"] == 5)
    assert not exact.any()  # LIDC has no malignancy-1 nodule rated lobulation 4 and spiculation 5
    distances = np.sqrt(sum((levels[f] - v) ** 2 for f, v in request.items()))
    nodule_id, distance = choose_outline(table, request, None, np.random.RandomState(1))
    assert distance == pytest.approx(float(distances.min())) and distance > 0
    row = table.set_index("nodule_id").loc[nodule_id]
    assert np.sqrt(sum((_level(row[f]) - v) ** 2 for f, v in request.items())) == pytest.approx(distance)


def test_size_steers_the_outline_to_nodules_of_about_that_diameter():
    table = usable_nodule_table().set_index("nodule_id")
    rng = np.random.RandomState(2)
    diameters = [table.loc[choose_outline(usable_nodule_table(), {"malignancy": 5}, 25.0, rng)[0], "diameter_mm"]
                 for _ in range(30)]
    assert all(25.0 / 1.5 <= d <= 25.0 * 1.5 for d in diameters)


def test_the_synthesizer_records_the_outline_distance(slice_hu):
    hu, spacing = slice_hu
    synth = NoduleSynthesizer(malignancy=1, lobulation=4, spiculation=5, model="default")
    params = synth.draw(hu, None, np.random.RandomState(0), (spacing, spacing))
    assert params.outline_distance > 0 and not params.skipped


def test_a_slice_stored_as_a_volume_of_depth_one_gets_the_centre_layer(slice_hu, smoke_models):
    """(H, W, 1): the one slice must get the nodule's widest (centre) layer, not its top cap."""
    hu, spacing = slice_hu
    volume = hu[..., None]
    synth = NoduleSynthesizer(malignancy=5, size_mm=12.0, model=str(smoke_models), steps=2)
    for seed in range(6):
        params = synth.draw(volume, np.zeros(volume.shape, np.float32), np.random.RandomState(seed),
                            (spacing, spacing, 2.5))
        if params.skipped:
            continue
        assert params.slices == (0,) and params.centre_slice == 0
        out, label, info = synth.apply(volume, np.zeros(volume.shape, np.float32), params, (spacing, spacing, 2.5))
        assert info["changed_pixels"] > 0 and (label > 0).sum() > 0 and info["skipped"] == ""
        flat = synth.apply(hu, np.zeros(hu.shape, np.float32), params, (spacing, spacing))[1]
        assert (label[..., 0] > 0).sum() == (flat > 0).sum()  # the 2D slice gets the same (centre) layer
        return
    pytest.fail("no draw found lung")


def test_when_nothing_changes_skipped_says_why(slice_hu, smoke_models):
    hu, spacing = slice_hu
    volume = np.stack([hu] * 3, axis=-1)
    synth = NoduleSynthesizer(malignancy=5, size_mm=12.0, model=str(smoke_models), steps=2)
    params = synth.draw(volume, None, np.random.RandomState(0), (spacing, spacing, 2.5))
    far = params.__class__(**{**params.to_dict(), "slices": (2,), "centre_slice": -40})  # the nodule's layers end far above
    out, _, info = synth.apply(volume, None, far, (spacing, spacing, 2.5))
    assert info["changed_pixels"] == 0 and "empty" in info["skipped"]
    assert np.array_equal(out, volume)


def test_an_all_air_slice_has_no_lung_and_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not lung_mask_from_hu(np.full((64, 64), -1000.0), 1.0).any()
        synth = NoduleSynthesizer(malignancy=5, model="default")
        params = synth.draw(np.full((64, 64), -1000.0, np.float32), None, np.random.RandomState(0), (2.8, 2.8))
    assert params.skipped == "no lung tissue"


def test_the_semantic_map_needs_the_spacing():
    with pytest.raises(ValueError, match="spacing_mm must be the slice's pixel spacing in mm"):
        semantic_map_from_hu(np.full((32, 32), -1000.0))


def test_insertion_sites_keep_clear_of_existing_nodules(phantom_dataset):
    """Insert mode on slices that have nodules: no new footprint touches an existing one (nor its 5 mm margin)."""
    dataset = PreparedDataset(phantom_dataset)
    cases = [dataset[c] for c in dataset.cases[dataset.cases.n_nodules > 0].case_id]
    synth = NoduleSynthesizer(malignancy="balanced", model="default")
    from lsdm_aug.transforms.core import nodule_outline

    overlaps = draws = 0
    for seed in range(1000):
        case = cases[seed % len(cases)]
        label = case["nodule_mask"].astype(np.float32)
        params = synth.draw(unit_to_hu(case["image"]), label, np.random.RandomState(seed),
                            (case["spacing_mm"],) * 2)
        if params.skipped:
            continue
        draws += 1
        outline = nodule_outline(params.nodule_id, (case["spacing_mm"],) * 2, 2, None)[:, :, 0]
        rows, cols = np.nonzero(outline)
        top = int(round(params.centre[0] - (rows.min() + rows.max() + 1) / 2)) + rows.min()
        left = int(round(params.centre[1] - (cols.min() + cols.max() + 1) / 2)) + cols.min()
        placed = np.zeros(label.shape, bool)
        r, c = rows - rows.min() + top, cols - cols.min() + left
        keep = (r >= 0) & (r < label.shape[0]) & (c >= 0) & (c < label.shape[1])
        placed[r[keep], c[keep]] = True
        overlaps += bool((placed & (label > 0)).any())
    assert draws > 500 and overlaps == 0


def test_3d_sites_keep_clear_of_nodules_on_the_slices_the_new_one_spans(slice_hu):
    hu, spacing = slice_hu
    volume = np.stack([hu] * 6, axis=-1)
    label = np.zeros(volume.shape, np.float32)
    lung = semantic_map_from_hu(hu, spacing_mm=spacing) == 4
    label[..., 4][lung] = 1  # the whole lung is "nodule" on slice 4
    synth = NoduleSynthesizer(malignancy=5, size_mm=20.0, model="default")
    for seed in range(10):
        params = synth.draw(volume, label, np.random.RandomState(seed), (spacing, spacing, 2.0))
        assert params.skipped == "no lung tissue" or 4 not in params.slices


def test_a_3d_insertion_can_be_centred_on_a_chosen_slice(slice_hu):
    hu, spacing = slice_hu
    volume = np.repeat(hu[..., None], 5, axis=2)
    synth = NoduleSynthesizer(malignancy=4, size_mm=10.0)
    centres = {synth.draw(volume, None, np.random.RandomState(seed), (spacing, spacing, 2.0), centre_slice=3).centre_slice
               for seed in range(5)}
    assert centres == {3}
    params = synth.draw(volume, None, np.random.RandomState(0), (spacing, spacing, 2.0), centre_slice=3)
    assert 3 in params.slices and params.slices == tuple(sorted(params.slices))
    with pytest.raises(ValueError, match="centre_slice must index an axial slice .* got 5"):
        synth.draw(volume, None, np.random.RandomState(0), (spacing, spacing, 2.0), centre_slice=5)
    with pytest.raises(ValueError, match="centre_slice must index"):
        synth.draw(hu, None, np.random.RandomState(0), (spacing, spacing), centre_slice=0)


@pytest.mark.parametrize("voxel_mm", [(2.7, 2.7, 1.5), (0.7, 0.7, 2.5), (0.5, 0.5, 0.6)])
def test_3d_outlines_have_no_empty_end_layers_so_the_middle_layer_lands_on_the_centre_slice(voxel_mm):
    from lsdm_aug.transforms.core import nodule_outline, usable_nodule_table

    for nodule_id in usable_nodule_table().nodule_id.iloc[:60]:
        outline = nodule_outline(nodule_id, voxel_mm, 3, None)
        assert outline[:, :, 0].any() and outline[:, :, -1].any(), nodule_id
        assert outline[:, :, outline.shape[2] // 2].any(), nodule_id


def test_a_usable_nodule_is_looked_up_by_id_and_an_unknown_id_is_named():
    from lsdm_aug.transforms.core import usable_nodule

    table = usable_nodule_table()
    row = table.iloc[7]
    assert usable_nodule(row.nodule_id).diameter_mm == row.diameter_mm
    with pytest.raises(ValueError, match=r"no usable LIDC nodule 'LIDC-IDRI-9999-n00' \(ids look like 'LIDC-IDRI-"):
        usable_nodule("LIDC-IDRI-9999-n00")
