"""The ROC AUC of two groups of scores with a bootstrap interval: how far a control AUC measured on a few dozen
generated nodules can be trusted.

The model-quality gates compare AUCs of 16-48 insertions per class with thresholds such as 0.75; at 16 per class a
95 % interval spans about +-0.19, so a point figure alone cannot say whether a gate is missed or merely not shown.
:func:`auc_interval` resamples each group with replacement (stratified, so every resample keeps both classes) with
scipy's ``bootstrap`` (percentile method), the AUC as scipy's Mann-Whitney U over the product of the group sizes
(the same value as scikit-learn's ``roc_auc_score``, ties counting half, and vectorized over resamples).

Example:
    >>> import numpy as np
    >>> high, low = np.array([0.9, 0.8, 0.7, 0.4]), np.array([0.5, 0.3, 0.2, 0.1])
    >>> roc_auc(high, low)
    0.9375
    >>> labelled_auc([1, 1, 1, 1, 0, 0, 0, 0], np.r_[high, low])  # the same, from labels and scores
    0.9375
    >>> lower, upper = auc_interval(high, low, resamples=200, seed=0)
    >>> bool(lower <= 0.9375 <= upper <= 1.0)
    True
"""

from __future__ import annotations

import numpy as np

__all__ = ["roc_auc", "labelled_auc", "auc_interval"]


def _scores(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` as a 1D float array of at least one finite score, or an error naming ``name``."""
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or len(array) == 0 or not np.isfinite(array).all():
        raise ValueError(f"{name} must be a non-empty 1D array of finite scores, got shape {array.shape}"
                         + ("" if array.ndim != 1 or not len(array) else " with non-finite values"))
    return array


def roc_auc(high: np.ndarray, low: np.ndarray) -> float:
    """ROC AUC of scores ``high`` (the positive class) against ``low``: the chance that a random member of
    ``high`` scores above one of ``low`` (ties count half)."""
    high, low = _scores(high, "high"), _scores(low, "low")
    return float(_auc(high, low))


def labelled_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """:func:`roc_auc` of ``scores`` whose ``labels`` (0 / 1 or bool, one per score) are 1 for the positive class:
    scikit-learn's ``roc_auc_score(labels, scores)``."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.shape != scores.shape or labels.ndim != 1 or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be one 0 / 1 label per score, got labels of shape {labels.shape} with values "
                         f"{sorted(set(np.unique(labels).tolist()))[:5]} for scores of shape {scores.shape}")
    positive = labels.astype(bool)
    if positive.all() or not positive.any():
        raise ValueError(f"labels must hold both a positive (1) and a negative (0) score, got {len(labels)} labels "
                         f"all {int(positive[0]) if len(labels) else 'absent'}")
    return roc_auc(scores[positive], scores[~positive])


def _auc(high: np.ndarray, low: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUC along ``axis`` (batches of resamples at once)."""
    from scipy.stats import mannwhitneyu

    return mannwhitneyu(high, low, axis=axis).statistic / (high.shape[axis] * low.shape[axis])


def auc_interval(high: np.ndarray, low: np.ndarray, resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """The ``confidence`` percentile-bootstrap interval of :func:`roc_auc` (``high`` and ``low`` resampled
    separately, ``resamples`` times, seeded with ``seed``)."""
    from scipy.stats import bootstrap

    high, low = _scores(high, "high"), _scores(low, "low")
    if isinstance(resamples, bool) or not isinstance(resamples, int | np.integer) or resamples < 2:
        raise ValueError(f"resamples must be an int >= 2, got {resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    result = bootstrap((high, low), _auc, n_resamples=int(resamples), confidence_level=confidence,
                       method="percentile", vectorized=True, random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
