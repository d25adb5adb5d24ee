"""Saturated draws: a nodule told "not calcified" that comes out as a bright blob is drawn again.

A diffusion draw occasionally paints a non-calcified request with a core of bone-like density (a 90th
percentile of 400 HU or more inside its outline: no solid nodule of the phantom or of LIDC's soft-tissue
nodules reaches it; calcium does). When the U-Net was told calcification 6 (LIDC's "absent"), such a draw
contradicts the request, so the edit path draws that nodule again with the next seed of a fixed sequence,
at most ``max_redraws`` times, and records how many redraws it took and whether the last one is still
saturated. A request that does not say "not calcified" is never redrawn: calcium may be what it asked for.
The U-Net hears "not calcified" only under classifier-free guidance (``cfg_scale`` > 0), so only then.
A saturated draw that a redraw cannot mend is usually held by its site (a dense neighbour in the window),
not by its seed.

Example:
    >>> import numpy as np
    >>> from lsdm_aug.data.prepared import hu_to_unit
    >>> region = np.zeros((8, 8), bool); region[2:6, 2:6] = True
    >>> is_saturated(hu_to_unit(np.full((8, 8), 650.0)), region), is_saturated(hu_to_unit(np.zeros((8, 8))), region)
    (True, False)
    >>> told_not_calcified({"calcification": 6.0}), told_not_calcified({"texture": 5.0})
    (True, False)
    >>> redraw_seed(7, 0), redraw_seed(7, 1) == redraw_seed(7, 1) != 7
    (7, True)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from lsdm_aug.data.prepared import unit_to_hu

__all__ = ["SATURATED_HU", "NOT_CALCIFIED", "DEFAULT_MAX_REDRAWS", "is_saturated", "told_not_calcified", "redraw_seed",
           "checked_max_redraws"]

SATURATED_HU = 400.0
NOT_CALCIFIED = 6  # LIDC calcification 6 = absent

DEFAULT_MAX_REDRAWS = 2


def checked_max_redraws(value: int) -> int:
    """``value`` as the number of redraws allowed (an int >= 0, NumPy's too), or an error naming it.

    Example:
        >>> checked_max_redraws(np.int64(3)), checked_max_redraws(0)
        (3, 0)
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"max_redraws must be an int >= 0, got {value!r}")
    return int(value)


def is_saturated(image_unit: np.ndarray, region: np.ndarray) -> bool:
    """Whether the 90th percentile of ``image_unit`` (in [-1, 1]) inside ``region`` (bool) reaches
    :data:`SATURATED_HU`; False for an empty region."""
    region = np.asarray(region, bool)
    if not region.any():
        return False
    return bool(np.percentile(unit_to_hu(np.asarray(image_unit)[region]), 90) >= SATURATED_HU)


def told_not_calcified(told: Mapping[str, float]) -> bool:
    """Whether the features the U-Net was told say calcification 6 (absent)."""
    value = told.get("calcification")
    return value is not None and int(round(float(value))) == NOT_CALCIFIED


def redraw_seed(seed: int, attempt: int) -> int:
    """The seed of redraw ``attempt`` (0: ``seed`` itself); a fixed function of both, so a redraw reproduces."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt!r}")
    if attempt == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) % 2**64, int(attempt)]).generate_state(1)[0])
