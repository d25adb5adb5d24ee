"""The control AUC and its bootstrap interval."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lsdm_aug.metrics.auc import auc_interval, labelled_auc, roc_auc


def test_the_auc_is_scikit_learns_with_ties_counting_half():
    rng = np.random.default_rng(0)
    high, low = rng.integers(0, 4, 9).astype(float), rng.integers(0, 4, 7).astype(float)  # many ties
    expected = roc_auc_score(np.r_[np.ones(9), np.zeros(7)], np.r_[high, low])
    assert roc_auc(high, low) == pytest.approx(expected)
    assert roc_auc(np.array([1.0]), np.array([1.0])) == 0.5


@pytest.mark.parametrize("label_type", [bool, int, float])
def test_the_auc_from_labels_is_scikit_learns_in_any_order(label_type):
    rng = np.random.default_rng(2)
    labels, scores = rng.integers(0, 2, 40), rng.integers(0, 6, 40).astype(float)
    assert labelled_auc(labels.astype(label_type), scores) == pytest.approx(roc_auc_score(labels, scores))
    order = rng.permutation(40)
    assert labelled_auc(labels[order], scores[order]) == labelled_auc(labels, scores)


@pytest.mark.parametrize("labels, named", [([0, 1, 2], "values \\[0, 1, 2\\]"), ([0, 1], "shape \\(2,\\)"),
                                           ([1, 1, 1], "a positive \\(1\\) and a negative \\(0\\)")])
def test_labels_that_cannot_make_an_auc_are_named(labels, named):
    with pytest.raises(ValueError, match=named):
        labelled_auc(np.array(labels), np.array([0.1, 0.2, 0.3]))


def test_the_interval_holds_the_auc_narrows_with_more_requests_and_repeats_with_its_seed():
    rng = np.random.default_rng(1)
    high, low = rng.normal(0.6, 0.2, 192), rng.normal(0.4, 0.2, 192)
    few = auc_interval(high[:16], low[:16], seed=3)
    many = auc_interval(high, low, seed=3)
    assert few[0] <= roc_auc(high[:16], low[:16]) <= few[1] and many[0] <= roc_auc(high, low) <= many[1]
    assert many[1] - many[0] < 0.6 * (few[1] - few[0])  # about 1 / sqrt(12) as wide with 12x the requests
    assert auc_interval(high[:16], low[:16], seed=3) == few and auc_interval(high[:16], low[:16], seed=4) != few


def test_separated_classes_give_an_interval_of_one():
    assert auc_interval(np.array([0.9, 0.8, 0.95]), np.array([0.1, 0.2]), resamples=50) == (1.0, 1.0)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"high": np.array([]), "low": np.array([0.1])}, r"high must be a non-empty 1D array of finite scores, got shape \(0,\)"),
    ({"high": np.array([0.5]), "low": np.array([np.nan])}, "low must be .* with non-finite values"),
    ({"high": np.ones((2, 2)), "low": np.array([0.1])}, r"got shape \(2, 2\)"),
    ({"high": np.array([0.5]), "low": np.array([0.1]), "resamples": 1}, "resamples must be an int >= 2, got 1"),
    ({"high": np.array([0.5]), "low": np.array([0.1]), "confidence": 1.0}, r"confidence must be in \(0, 1\), got 1.0"),
])
def test_bad_scores_and_settings_are_named(kwargs, named):
    with pytest.raises(ValueError, match=named):
        auc_interval(**kwargs)
