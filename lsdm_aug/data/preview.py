"""A grid picture of a prepared dataset: image | nodule close-up | semantic map | nodule mask.

Example:
    >>> preview_grid("prepared/phantom-128", "grid.png", count=4)  # doctest: +SKIP
    PosixPath('grid.png')
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lsdm_aug.data.prepared import PreparedDataset, unit_to_hu
from lsdm_aug.data.semantic import NUM_LABELS, SemanticLabel

__all__ = ["preview_grid", "SEMANTIC_COLOURS"]

#: One colour per semantic label, background to malignant nodule.
SEMANTIC_COLOURS = ("#000000", "#8c6d31", "#d6616b", "#f7f7f7", "#3182bd", "#31a354", "#fdae6b", "#e6550d")


def _pick_cases(dataset: PreparedDataset, count: int, nodules_first: bool, seed: int) -> list[str]:
    ids = dataset.cases.case_id.to_numpy()
    order = np.random.default_rng(seed).permutation(len(ids))
    if nodules_first:
        has = dataset.cases.n_nodules.to_numpy()[order] > 0
        order = np.concatenate([order[has], order[~has]])
    return [str(ids[i]) for i in order[:count]]


def _close_up(hu: np.ndarray, nodule_mask: np.ndarray, spacing_mm: float, width_mm: float = 48.0):
    if not nodule_mask.any():
        return None
    rows, cols = np.nonzero(nodule_mask == 1)
    half = max(4, int(round(width_mm / spacing_mm / 2)))
    r, c = int(rows.mean()), int(cols.mean())
    window = (slice(max(r - half, 0), r + half), slice(max(c - half, 0), c + half))
    return hu[window], nodule_mask[window]


def preview_grid(dataset_dir: str | Path, out: str | Path, count: int = 6, nodules_first: bool = True,
                 seed: int = 0) -> Path:
    """Draw ``count`` cases of a prepared dataset into a PNG and return its path.

    Args:
        dataset_dir: prepared dataset folder.
        out: PNG path (parent folders are created).
        count: number of rows.
        nodules_first: prefer cases with nodules.
        seed: which cases are picked.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    if count <= 0:
        raise ValueError(f"count must be > 0, got {count!r}")
    dataset = PreparedDataset(dataset_dir)
    case_ids = _pick_cases(dataset, count, nodules_first, seed)
    if not case_ids:
        raise ValueError(f"{str(dataset_dir)!r} holds no cases to preview")
    figure, axes = plt.subplots(len(case_ids), 4, figsize=(13, 3.3 * len(case_ids)), squeeze=False)
    colours = ListedColormap(SEMANTIC_COLOURS)
    for row, case_id in zip(axes, case_ids):
        case = dataset[case_id]
        hu = unit_to_hu(case["image"])
        row[0].imshow(hu, cmap="gray", vmin=-1000, vmax=400)
        row[0].set_title(f"{case_id}\n{case['spacing_mm']:.2f} mm/px", fontsize=8)
        close = _close_up(hu, case["nodule_mask"], case["spacing_mm"])
        if close is not None:
            row[1].imshow(close[0], cmap="gray", vmin=-1000, vmax=400)
            row[1].contour(close[1] == 1, levels=[0.5], colors="yellow", linewidths=0.6)
            n = case["nodules"][0]
            row[1].set_title("malignancy {malignancy:g} texture {texture:g} calc {calcification:g}\n"
                             "spic {spiculation:g} lob {lobulation:g} margin {margin:g}".format(**n), fontsize=8)
        row[2].imshow(case["semantic_map"], cmap=colours, vmin=-0.5, vmax=NUM_LABELS - 0.5, interpolation="nearest")
        row[2].set_title("semantic map", fontsize=8)
        row[3].imshow(case["nodule_mask"], cmap="magma", interpolation="nearest")
        row[3].set_title(f"nodule mask ({len(case['nodules'])} nodules)", fontsize=8)
        for axis in row:
            axis.axis("off")
    handles = [Patch(color=SEMANTIC_COLOURS[label], label=f"{label.value} {label.name.lower()}") for label in SemanticLabel]
    figure.legend(handles=handles, loc="lower center", ncol=4, fontsize=8)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return out
