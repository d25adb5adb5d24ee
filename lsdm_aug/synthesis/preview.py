"""``synthesize --preview grid.png``: a grid of synthetic nodules, one row per requested level combination.

Each cell is a close-up (a quarter of the slice side) around the inserted nodule in a lung window,
the label's outline in yellow.

Example:
    >>> draw_preview("Dataset501", manifest, "grid.png", {"malignancy": [1, 2, 3, 4, 5]})  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lsdm_aug.data.nnunet_format import read_case  # noqa: E402
from lsdm_aug.data.prepared import atomic_write_figure  # noqa: E402

__all__ = ["draw_preview"]


def _close_up(image: np.ndarray, label: np.ndarray, centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    half = max(8, image.shape[0] // 8)
    row = int(np.clip(round(centre[0]), half, image.shape[0] - half))
    col = int(np.clip(round(centre[1]), half, image.shape[1] - half))
    window = (slice(row - half, row + half), slice(col - half, col + half))
    return image[window], label[window]


def _rows(manifest: pd.DataFrame, levels: dict[str, list[int]]) -> list[tuple[str, pd.DataFrame]]:
    """(title, cases) per combination of the balanced levels; one row of all cases when nothing is balanced."""
    if not levels:
        return [("all cases", manifest)]
    rows = []
    for combination in itertools.product(*levels.values()):
        chosen = manifest
        for name, value in zip(levels, combination):
            chosen = chosen[chosen[f"{name}_asked"] == value]
        rows.append((", ".join(f"{n} {v}" for n, v in zip(levels, combination)), chosen))
    return rows


def draw_preview(dataset_dir: str | Path, manifest: pd.DataFrame, out: str | Path,
                 levels: dict[str, list[int]], per_row: int = 6) -> Path:
    """Draw the grid of ``dataset_dir``'s cases into ``out`` (PNG, written atomically); returns its path."""
    rows = _rows(manifest, levels)[:12]
    figure, axes = plt.subplots(len(rows), per_row, figsize=(1.6 * per_row, 1.8 * len(rows)), squeeze=False)
    for axis_row, (title, cases) in zip(axes, rows):
        axis_row[0].set_title(title, fontsize=8, loc="left")
        for axis, case in itertools.zip_longest(axis_row, cases.head(per_row).itertuples()):
            axis.axis("off")
            if case is None:
                continue
            image, label, _ = read_case(dataset_dir, case.case_id)
            close, mask = _close_up(image, label, (case.centre_row, case.centre_col))
            axis.imshow(close, cmap="gray", vmin=-1000, vmax=400)
            if mask.any():
                axis.contour(mask > 0, levels=[0.5], colors="yellow", linewidths=0.5)
            axis.text(1, 3, case.case_id[-6:], color="white", fontsize=6)
    figure.tight_layout()
    out = Path(out)
    atomic_write_figure(out, figure, dpi=90)
    plt.close(figure)
    return out
