"""The saturation check and the redraw seeds of the edit path."""

from __future__ import annotations

import numpy as np
import pytest

from lsdm_aug.data.prepared import hu_to_unit
from lsdm_aug.editing import SATURATED_HU, is_saturated, redraw_seed, told_not_calcified


def test_saturated_means_a_90th_percentile_of_400_hu_or_more_inside_the_region():
    region = np.zeros((10, 10), bool)
    region[:, :5] = True  # 50 pixels
    hu = np.full((10, 10), 900.0)  # bright outside the region must not count
    hu[region] = -100.0
    assert not is_saturated(hu_to_unit(hu), region)
    hu[:4, :5] = SATURATED_HU + 10  # 20 of 50 bright: the 90th percentile is bright
    assert is_saturated(hu_to_unit(hu), region)
    hu[:4, :5] = -100.0
    hu[0, :4] = SATURATED_HU + 10  # 4 of 50 (8 %): below the 90th percentile
    assert not is_saturated(hu_to_unit(hu), region)
    assert not is_saturated(hu_to_unit(hu), np.zeros((10, 10), bool))


@pytest.mark.parametrize(("told", "expected"), [({"calcification": 6}, True), ({"calcification": 6.0}, True),
                                                ({"calcification": 3}, False), ({}, False), ({"texture": 6}, False)])
def test_only_calcification_6_is_not_calcified(told, expected):
    assert told_not_calcified(told) is expected


def test_redraw_seeds_are_fixed_distinct_and_start_from_the_request():
    assert redraw_seed(11, 0) == 11
    seeds = {redraw_seed(seed, attempt) for seed in range(20) for attempt in range(1, 4)}
    assert len(seeds) == 60 and not seeds & set(range(20))
    assert redraw_seed(11, 2) == redraw_seed(11, 2)
    assert redraw_seed(-5, 1) >= 0  # a valid torch seed
    with pytest.raises(ValueError, match="attempt must be >= 0, got -1"):
        redraw_seed(1, -1)
