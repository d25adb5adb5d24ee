"""Context-aware blending of a nodule patch into a slice: Poisson image editing (Pérez et al., 2003).

Inside the region the result keeps the patch's gradients (the nodule's shape, texture and contrast
against its own surroundings); on the region's border it equals the target, so the nodule takes on
the local intensity of the lung it lands in. Outside the region nothing changes.

OpenCV's ``seamlessClone`` does the same on 8-bit colour images only; CT needs floats, hence this
small sparse solve (SciPy).

Example:
    >>> import numpy as np
    >>> target, source = np.full((9, 9), -800.0), np.full((9, 9), -900.0)
    >>> source[3:6, 3:6] = 0.0
    >>> region = np.zeros((9, 9), bool); region[2:7, 2:7] = True
    >>> out = poisson_blend(target, source, region)
    >>> round(float(out[4, 4] - out[2, 2]))  # the nodule's 900 HU contrast over its surroundings is kept
    900
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import spsolve

__all__ = ["poisson_blend"]

_NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def poisson_blend(target: np.ndarray, source: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``target`` with ``source`` seamlessly cloned into ``region`` (2D arrays of one shape, float result).

    The region must not touch the array's edge (its border values come from ``target``).
    """
    target, source, region = np.asarray(target, np.float64), np.asarray(source, np.float64), np.asarray(region, bool)
    if not target.shape == source.shape == region.shape or target.ndim != 2:
        raise ValueError(f"target, source and region must be 2D of one shape, got {target.shape}, {source.shape}, "
                         f"{region.shape}")
    if region[0].any() or region[-1].any() or region[:, 0].any() or region[:, -1].any():
        raise ValueError("the blend region must not touch the edge of the array")
    out = target.copy()
    if not region.any():
        return out
    rows, cols = np.nonzero(region)
    index = -np.ones(region.shape, int)
    index[rows, cols] = np.arange(len(rows))
    matrix_rows, matrix_cols, values = [np.arange(len(rows))], [np.arange(len(rows))], [np.full(len(rows), 4.0)]
    rhs = np.zeros(len(rows))
    for dr, dc in _NEIGHBOURS:
        nr, nc = rows + dr, cols + dc
        rhs += source[rows, cols] - source[nr, nc]  # the guidance field: the source's gradients
        inside = region[nr, nc]
        matrix_rows.append(np.flatnonzero(inside))
        matrix_cols.append(index[nr[inside], nc[inside]])
        values.append(-np.ones(int(inside.sum())))
        rhs[~inside] += target[nr[~inside], nc[~inside]]  # Dirichlet border: the target
    system = sparse.csr_matrix((np.concatenate(values), (np.concatenate(matrix_rows), np.concatenate(matrix_cols))),
                               shape=(len(rows), len(rows)))
    out[rows, cols] = spsolve(system, rhs)
    return out
