"""The data layer report's outline signal: shape descriptors of LIDC outlines and their AUC per rating."""

from __future__ import annotations

import numpy as np

from lsdm_aug.benchmarks.data_layer import outline_descriptors, outline_signal, outline_signal_markdown
from lsdm_aug.transforms.core import usable_nodule_table


def test_a_lobulated_outline_is_less_solid_and_less_circular_than_a_disc():
    rows, cols = np.ogrid[:64, :64]
    disc = (rows - 32) ** 2 + (cols - 32) ** 2 <= 15 ** 2
    angle = np.arctan2(rows - 32, cols - 32)
    lobes = np.hypot(rows - 32, cols - 32) <= 12 + 5 * np.cos(5 * angle)
    smooth, lobed = outline_descriptors(disc), outline_descriptors(lobes)
    assert smooth["solidity"] > 0.9 > 0.7 > lobed["solidity"]
    assert smooth["circularity"] > lobed["circularity"]
    assert smooth["eccentricity"] < 0.2


def test_outline_signal_gives_each_rating_its_aucs_and_a_table():
    signal = outline_signal(usable_nodule_table().head(300), spacing_mm=0.7)
    for rating in ("lobulation", "spiculation"):
        result = signal[rating]
        assert result["high"] > 0 and result["low"] > result["high"]
        assert all(0.5 <= auc <= 1.0 for auc in result["single"].values())
        assert 0.0 <= result["all_descriptors"] <= 1.0
    text = "\n".join(outline_signal_markdown(signal))
    assert "| lobulation |" in text and "all four (5-fold CV)" in text
