"""The data layer report's outline signal: shape descriptors of LIDC outlines and their AUC per rating."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lsdm_aug.benchmarks.data_layer import (appearance_signal, appearance_signal_markdown, outline_descriptors,
                                            outline_signal, outline_signal_markdown)
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


def _rated_table(rng: np.random.Generator, count: int, margin_tells: bool) -> pd.DataFrame:
    diameter = rng.uniform(4, 30, count)
    malignant = rng.random(count) < (diameter / 30)  # larger nodules more often malignant, as in LIDC
    margin = np.where(malignant, 2.0, 4.0) if margin_tells else rng.integers(1, 6, count).astype(float)
    return pd.DataFrame({"malignancy": np.where(malignant, 5.0, 1.0), "diameter_mm": diameter, "margin": margin,
                         "texture": rng.integers(1, 6, count).astype(float), "calcification": 6.0})


def test_appearance_signal_finds_a_margin_that_tells_malignancy_within_sizes_and_none_where_there_is_none():
    rng = np.random.default_rng(0)
    telling = appearance_signal(_rated_table(rng, 600, margin_tells=True))
    silent = appearance_signal(_rated_table(rng, 600, margin_tells=False))
    assert telling["within_stratum"]["margin"] > 0.95 and telling["within_stratum"]["texture and margin"] > 0.95
    assert abs(silent["within_stratum"]["texture and margin"] - 0.5) < 0.1
    assert silent["overall"]["diameter"] > 0.7  # size tells, but guidance alone keeps the outline
    text = "\n".join(appearance_signal_markdown(silent))
    assert "| texture and margin levels, within strata (logistic, 5-fold CV) |" in text


def test_outline_signal_also_scores_the_levels_the_control_gate_requests():
    signal = outline_signal(usable_nodule_table().head(300), spacing_mm=0.7)
    extremes = signal["spiculation"]["extremes"]
    assert 0 < extremes["high"] <= signal["spiculation"]["high"] and 0 < extremes["low"] <= signal["spiculation"]["low"]
    assert "level 1 vs 5" in "\n".join(outline_signal_markdown(signal))
