"""The CT window of nnU-Net plans: nnU-Net's foreground percentiles of a nodule dataset hide the lung."""

from __future__ import annotations

import pytest

from lsdm_aug.nnunet.plans import check_lung_window, widen_ct_window

NARROW = {"mean": 40.0, "std": 120.0, "percentile_00_5": -49.0, "percentile_99_5": 796.0}  # the phantom's plans


def test_widen_sets_every_channel_window_and_keeps_the_z_score_and_the_input():
    plans = {"foreground_intensity_properties_per_channel": {"0": dict(NARROW), "1": dict(NARROW)}, "other": 1}
    widened = widen_ct_window(plans, -1000, 500)
    for channel in widened["foreground_intensity_properties_per_channel"].values():
        assert channel == {"mean": 40.0, "std": 120.0, "percentile_00_5": -1000.0, "percentile_99_5": 500.0}
    assert plans["foreground_intensity_properties_per_channel"]["0"] == NARROW and widened["other"] == 1
    with pytest.raises(ValueError, match="low < high, got low=800 and high=-1024"):
        widen_ct_window(plans, 800, -1024)
    with pytest.raises(ValueError, match="run nnU-Net's planning first"):
        widen_ct_window({}, -1024, 800)


def test_a_window_that_flattens_the_lung_is_refused_with_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"clips this dataset's CT at -49 HU .*widen_ct_window"):
        check_lung_window(NARROW)
    check_lung_window(widen_ct_window({"foreground_intensity_properties_per_channel": {"0": NARROW}})
                      ["foreground_intensity_properties_per_channel"]["0"])
