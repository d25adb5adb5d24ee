"""Shared settings for the data tests."""

from __future__ import annotations

import pytest
from threadpoolctl import threadpool_limits


@pytest.fixture(scope="session", autouse=True)
def _one_openmp_thread():
    """Run scikit-learn's K-means (in the lung segmentation) on one OpenMP thread.

    On a 2-core machine that is busy with anything else (pytest-xdist, a benchmark), two spinning
    OpenMP threads make each K-means call about 13x slower (0.24 s instead of 0.02 s per slice).
    Results do not depend on the thread count.
    """
    with threadpool_limits(limits=1, user_api="openmp"):
        yield
