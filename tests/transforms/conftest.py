"""Fixtures shared by the transform tests."""

from __future__ import annotations

import pytest

from lsdm_aug.data.prepared import PreparedDataset, unit_to_hu


@pytest.fixture(scope="module")
def slice_hu(phantom_dataset):
    """A nodule-free phantom slice in HU and its pixel spacing."""
    dataset = PreparedDataset(phantom_dataset)
    case = dataset[dataset.cases[dataset.cases.n_nodules == 0].case_id.iloc[0]]
    return unit_to_hu(case["image"]), float(case["spacing_mm"])
