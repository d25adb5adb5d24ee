"""``lsdm-aug benchmark data-layer``: phantom vs LIDC ratings, lung Dice of the semantic map, phantom speed,
and the 512 px phantom's vessels up close.

Writes data_layer.md, data_layer.json, nodule_gallery.png and vessel_closeups.png into the report folder.

Example:
    >>> report = run_data_layer("reports/data_layer", seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lsdm_aug.config import rating_level
from lsdm_aug.data.lidc import load_nodule_table
from lsdm_aug.data.phantom import ChestPhantom, PhantomConfig, prepare_phantom, rating_histogram
from lsdm_aug.data.semantic import lung_mask_from_hu
from lsdm_aug.metrics.auc import labelled_auc, roc_auc
from lsdm_aug.transforms.core import nodule_outline, usable_nodule_table

RATINGS = ("malignancy", "texture", "calcification", "spiculation", "lobulation", "margin")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def rating_distributions(count: int, seed: int) -> dict:
    """Shares per rounded level: database (nodules with a consensus mask) vs phantom vs balanced phantom."""
    phantom = ChestPhantom(PhantomConfig(size=128, nodule_free_fraction=0.0))
    balanced = ChestPhantom(PhantomConfig(size=128, nodule_free_fraction=0.0, balance=("malignancy",)))
    rng = np.random.default_rng(seed)
    drawn = pd.DataFrame([phantom.sample_nodule(rng) for _ in range(count)])
    drawn_balanced = pd.DataFrame([balanced.sample_nodule(rng) for _ in range(count)])
    placed = [n for ct in phantom.slices(min(count, 600), seed=seed) for n in ct.nodules]
    out = {}
    for rating in RATINGS:
        table = pd.DataFrame({"database": rating_histogram(phantom.nodule_table, rating),
                              "phantom_drawn": rating_histogram(drawn, rating),
                              "phantom_placed": rating_histogram(placed, rating),
                              "phantom_balanced_malignancy": rating_histogram(drawn_balanced, rating)}).fillna(0.0)
        out[rating] = {str(level): row.round(3).to_dict() for level, row in table.iterrows()}
    out["placed_nodules"] = len(placed)
    return out


def lung_dice(sizes: dict[int, int], seed: int) -> dict:
    result = {}
    for size, count in sizes.items():
        phantom = ChestPhantom(PhantomConfig(size=size))
        scores = [dice(lung_mask_from_hu(ct.hu, ct.spacing_mm), ct.lung_mask) for ct in phantom.slices(count, seed=seed)]
        result[str(size)] = {"slices": count, "mean": round(float(np.mean(scores)), 4),
                             "min": round(float(np.min(scores)), 4), "p05": round(float(np.percentile(scores, 5)), 4)}
    return result


def speed(count: int, seed: int) -> dict:
    phantom = ChestPhantom(PhantomConfig(size=128))
    start = time.perf_counter()
    for _ in phantom.slices(count, seed=seed):
        pass
    draw = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        prepare_phantom(Path(folder) / "ds", count, PhantomConfig(size=128), seed=seed)
        prepare = time.perf_counter() - start
    return {"slices": count, "size": 128, "draw_s_per_1000": round(draw / count * 1000, 1),
            "prepare_s_per_1000": round(prepare / count * 1000, 1)}


def nodule_gallery(path: Path, seed: int) -> None:
    """Close-ups at 512 px: calcified benign nodules next to spiculated solid malignant ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = load_nodule_table()
    table = table[(table.consensus_voxels > 30) & (table.n_readers >= 3)]
    groups = {
        "calcified, benign": table[(table.calcification <= 3) & (table.malignancy <= 2)],
        "spiculated solid, malignant": table[(table.spiculation >= 4) & (table.texture >= 4.5) & (table.malignancy >= 4)],
        "ground-glass": table[table.texture <= 1.5],
        "part-solid": table[table.texture.between(2.5, 3.5)],
    }
    figure, axes = plt.subplots(len(groups), 5, figsize=(12, 2.6 * len(groups)))
    for (name, rows), axis_row in zip(groups.items(), axes):
        phantom = ChestPhantom(PhantomConfig(size=512, nodule_free_fraction=0.0), nodule_table=rows)
        for k, axis in enumerate(axis_row):
            ct = phantom.slice(k * phantom.config.slices_per_patient + 3, seed=seed)
            n = ct.nodules[0]
            r, c, half = int(n["centre_row"]), int(n["centre_col"]), int(24 / ct.spacing_mm)
            axis.imshow(ct.hu[max(r - half, 0):r + half, max(c - half, 0):c + half], cmap="gray", vmin=-1000, vmax=400)
            axis.set_title(f"mal {n['malignancy']:g} tex {n['texture']:g} calc {n['calcification']:g}\n"
                           f"spic {n['spiculation']:g} lob {n['lobulation']:g} marg {n['margin']:g}", fontsize=7)
            axis.axis("off")
        axis_row[0].text(-0.1, 0.5, name, transform=axis_row[0].transAxes, rotation=90, va="center", ha="right")
    figure.suptitle("phantom nodules at 512 px, 48 mm close-ups, window [-1000, 400] HU")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def markdown(report: dict) -> str:
    lines = ["# Data layer", "", "Made by `lsdm-aug benchmark data-layer --out reports/data_layer`.", ""]
    lines += ["## Lung Dice of the semantic map on phantom slices", "", "| size | slices | mean | 5th pct | min |",
              "| --- | --- | --- | --- | --- |"]
    for size, d in report["lung_dice"].items():
        lines.append(f"| {size} | {d['slices']} | {d['mean']:.3f} | {d['p05']:.3f} | {d['min']:.3f} |")
    s = report["speed"]
    lines += ["", "## Speed (2 cores)", "", f"- drawing phantom slices at {s['size']} px: {s['draw_s_per_1000']} s per 1 000",
              f"- `prepare_phantom` (slices + semantic maps + atomic writes): {s['prepare_s_per_1000']} s per 1 000", ""]
    lines += ["## Rating distributions (share per rounded level)", "",
              f"database = LIDC nodules with a consensus mask; drawn = phantom's draw; placed = nodules placed in "
              f"{report['ratings']['placed_nodules']} phantom slices; balanced = `balance=('malignancy',)`.", ""]
    for rating in RATINGS:
        lines += [f"### {rating}", "", "| level | database | phantom drawn | phantom placed | balanced (malignancy) |",
                  "| --- | --- | --- | --- | --- |"]
        for level, row in report["ratings"][rating].items():
            lines.append(f"| {level} | {row['database']:.3f} | {row['phantom_drawn']:.3f} | {row['phantom_placed']:.3f} | "
                         f"{row['phantom_balanced_malignancy']:.3f} |")
        lines.append("")
    lines += ["![nodule gallery](nodule_gallery.png)", ""]
    v = report["vessels"]
    lines += ["## Vessels", "",
              "Pulmonary vessels are a branching tree grown from each hilum (6-8 trunks of 2-4.5 mm radius; each segment "
              "5-10 radii long splits into a major and a minor branch, about Murray's law, down to 0.4 mm). A slice shows "
              "some segments in plane and some cut across (round or, cut obliquely, elliptical), so cross-sections run "
              "from hilar 5 mm vessels to sub-millimetre peripheral twigs and branch points appear. Before, every "
              "vessel was an independent blob of 0.6-4.6 mm placed at random.", "",
              f"{v['trees']} trees, {v['segments_per_tree']:.0f} segments each; share of segments by radius:", "",
              "| radius (mm) | " + " | ".join(v["radius_mm_share"]) + " |",
              "| --- |" + " --- |" * len(v["radius_mm_share"]),
              "| share | " + " | ".join(f"{x:.2f}" for x in v["radius_mm_share"].values()) + " |", "",
              "![vessel close-ups](vessel_closeups.png)", ""]
    if "outline_signal" in report:
        lines += outline_signal_markdown(report["outline_signal"])
    if "appearance_signal" in report:
        lines += appearance_signal_markdown(report["appearance_signal"])
    return "\n".join(lines)


def outline_signal_markdown(signal: dict) -> list[str]:
    lines = ["## How much lobulation and spiculation the outlines carry", "",
             f"ROC AUC (rating <= 2 vs >= 4) of shape descriptors of each LIDC consensus outline's centre layer at "
             f"{signal['spacing_mm']:g} mm ({signal['nodules']} nodules): the ceiling of any judge that sees only the "
             "outline, as the phantom renders it (the 50 % consensus of the readers' contours smooths their lobes and "
             "spicules).", "",
             "| rating | low / high | " + " | ".join(SHAPE_DESCRIPTORS) + " | all four (5-fold CV) | level 1 vs 5: "
             "nodules, all four |", "| --- | --- |" + " --- |" * (len(SHAPE_DESCRIPTORS) + 2)]
    for rating in ("lobulation", "spiculation"):
        r = signal[rating]
        extremes = r.get("extremes")
        lines.append(f"| {rating} | {r['low']} / {r['high']} | " + " | ".join(f"{r['single'][n]:.3f}" for n in
                     SHAPE_DESCRIPTORS) + f" | {r['all_descriptors']:.3f} | " + (
                         f"{extremes['low']} / {extremes['high']}: {extremes['all_descriptors']:.3f} |" if extremes
                         else "n/a |"))
    return lines + ["", "Level 1 vs 5 is what the control gate requests: the same cross-validated scores on the "
                        "nodules whose (median) rating rounds to 1 or 5.", ""]


APPEARANCE_RATINGS = ("texture", "margin")  # what the phantom's renderer draws besides calcification (and the outline)
SIZE_BINS_MM = (0.0, 6.0, 8.0, 10.0, 15.0, 20.0, np.inf)


def appearance_signal(table: pd.DataFrame, seed: int = 0) -> dict:
    """How much malignancy the appearance carries once the outline is fixed: the ceiling of guidance alone.

    Guidance alone inserts one outline requested benign (malignancy 1) and malignant (5), the U-Net told the
    outline's own calcification. The phantom draws a nodule from its outline, texture, calcification and margin
    (:func:`~lsdm_aug.data.nodule_appearance.render_nodule`), so what may differ between the two requests is texture
    and margin. A generator drawing them as LIDC's radiologists rated them at that size and calcification tells
    the two requests apart only as well as texture and margin tell malignancy (<= 2 vs >= 4) within nodules of one
    size and calcification. Measured on LIDC's ratings: a logistic regression on the texture and margin levels
    (one-hot: the ties are not monotone) and the stratum (diameter bin x calcification level), its AUC over the
    pairs of one malignant and one benign nodule in the same stratum, 5-fold cross-validated and, optimistic,
    fitted and judged on all nodules; each rating alone (cross-validated); and, for scale, the plain AUCs of
    diameter and of the two ratings over all nodules.

    Example:
        >>> from lsdm_aug.transforms.core import usable_nodule_table
        >>> signal = appearance_signal(usable_nodule_table())
        >>> 0.5 < signal["within_stratum"]["texture and margin"] < 0.7 < signal["overall"]["diameter"]
        True
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rated = table[(table.malignancy <= 2) | (table.malignancy >= 4)]
    malignant = (rated.malignancy >= 4).to_numpy()
    levels = {name: pd.get_dummies(rating_level(rated[name].to_numpy())).to_numpy(float) for name in APPEARANCE_RATINGS}
    stratum = (np.digitize(rated.diameter_mm.to_numpy(), SIZE_BINS_MM[1:-1]) * 10
               + rating_level(rated.calcification.to_numpy(), 6))
    strata = pd.get_dummies(stratum).to_numpy(float)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)

    def judged(*ratings: np.ndarray, cross_validated: bool = True) -> float:
        design, model = np.column_stack([*ratings, strata]), LogisticRegression(max_iter=5000)
        score = (cross_val_predict(model, design, malignant, cv=folds, method="decision_function")
                 if cross_validated else model.fit(design, malignant).decision_function(design))
        return _within_stratum_auc(score, malignant, stratum)

    both = np.column_stack(list(levels.values()))
    plain = cross_val_predict(LogisticRegression(max_iter=5000), both, malignant, cv=folds, method="predict_proba")[:, 1]
    return {"benign": int((~malignant).sum()), "malignant": int(malignant.sum()),
            "strata": int(len(np.unique(stratum))), "pairs": _within_stratum_pairs(malignant, stratum),
            "within_stratum": {"texture and margin": judged(both),
                               "texture and margin, fitted on all": judged(both, cross_validated=False),
                               **{name: judged(level) for name, level in levels.items()}},
            "overall": {"diameter": float(labelled_auc(malignant, rated.diameter_mm)),
                        "texture and margin": float(labelled_auc(malignant, plain))}}


def _stratum_groups(score: np.ndarray, positive: np.ndarray, stratum: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(positives' scores, negatives' scores) of every stratum that holds both."""
    groups = [(score[(stratum == k) & positive], score[(stratum == k) & ~positive]) for k in np.unique(stratum)]
    return [(high, low) for high, low in groups if len(high) and len(low)]


def _within_stratum_pairs(positive: np.ndarray, stratum: np.ndarray) -> int:
    return sum(len(high) * len(low) for high, low in _stratum_groups(positive.astype(float), positive, stratum))


def _within_stratum_auc(score: np.ndarray, positive: np.ndarray, stratum: np.ndarray) -> float:
    """The chance that a positive scores above a negative of its own stratum (ties half), over all such pairs:
    each stratum's AUC weighted by its pairs.

    Example:
        >>> _within_stratum_auc(np.array([2.0, 1.0, 0.0, 5.0]), np.array([True, False, True, False]),
        ...                     np.array([0, 0, 1, 1]))
        0.5
    """
    groups = _stratum_groups(score, positive, stratum)
    pairs = sum(len(high) * len(low) for high, low in groups)
    if not pairs:
        return float("nan")
    return sum(roc_auc(high, low) * len(high) * len(low) for high, low in groups) / pairs


def appearance_signal_markdown(signal: dict) -> list[str]:
    w, o = signal["within_stratum"], signal["overall"]
    return ["## How much malignancy the appearance carries once the outline is fixed", "",
            "Guidance alone requests one outline benign and malignant (the U-Net told the outline's calcification); the "
            "phantom draws a nodule from its outline, texture, calcification and margin, so texture and margin are "
            "what can differ. On LIDC's ratings (malignancy <= 2 vs >= 4, "
            f"{signal['benign']} / {signal['malignant']} nodules), within {signal['strata']} strata of diameter "
            f"(bins at {', '.join(f'{b:g}' for b in SIZE_BINS_MM[1:-1])} mm) x calcification level "
            f"({signal['pairs']} malignant-benign pairs):", "",
            "| judged on | AUC |", "| --- | --- |",
            f"| texture and margin levels, within strata (logistic, 5-fold CV) | {w['texture and margin']:.3f} |",
            f"| the same fitted and judged on all nodules (optimistic) | {w['texture and margin, fitted on all']:.3f} |",
            f"| texture alone, within strata (5-fold CV) | {w['texture']:.3f} |",
            f"| margin alone, within strata (5-fold CV) | {w['margin']:.3f} |",
            f"| for scale: diameter, all nodules | {o['diameter']:.3f} |",
            f"| for scale: texture and margin, all nodules | {o['texture and margin']:.3f} |", "",
            "A generator that draws texture and margin as the radiologists rated them at a given size and calcification "
            "separates the two requests about as well as the first row; guidance alone can pass it only by "
            "drawing an appearance the data does not tie to malignancy.", ""]


def vessel_statistics(count: int, seed: int) -> dict:
    """Vessel segment radii of the 512 px phantom's trees (:func:`~lsdm_aug.data.phantom.vessel_tree`)."""
    from lsdm_aug.data.phantom import vessel_tree

    radii, segments = [], []
    for k in range(count):
        tree = vessel_tree([(-40.0, 0.0), (40.0, 0.0)], lambda x, y: 60 < abs(x) + 20 < 170 and abs(y) < 110,
                           np.random.default_rng([seed, k]))
        radii += [s[3] for s in tree]
        segments.append(len(tree))
    radii = np.array(radii)
    edges = [0.4, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0]
    counts = np.histogram(radii, bins=edges)[0]
    return {"trees": count, "segments_per_tree": float(np.mean(segments)),
            "radius_mm_share": {f"{a:g}-{b:g}": float(c / len(radii)) for a, b, c in zip(edges, edges[1:], counts)}}


def vessel_closeups(path: Path, seed: int) -> None:
    """Four 128 px close-ups of 512 px phantom lungs (lung window), the vessels a detector must not mistake."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phantom = ChestPhantom(PhantomConfig(size=512, nodule_free_fraction=0.0))
    figure, axes = plt.subplots(2, 4, figsize=(12, 6))
    for i, ax in enumerate(axes.flat):
        ct = phantom.slice(8 * i + 3, seed=seed)
        rows, cols = np.nonzero(ct.lung_mask)
        row, col = (int(ct.nodules[0]["centre_row"]), int(ct.nodules[0]["centre_col"])) if ct.nodules and i % 2 else (
            int(np.median(rows)), int(np.percentile(cols, 25)))
        top, left = np.clip(row - 64, 0, 384), np.clip(col - 64, 0, 384)
        ax.imshow(ct.hu[top:top + 128, left:left + 128], cmap="gray", vmin=-1000, vmax=200)
        ax.set_title(f"{ct.spacing_mm:.2f} mm" + (" (nodule)" if ct.nodules and i % 2 else ""), fontsize=9)
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


SHAPE_DESCRIPTORS = ("solidity", "circularity", "eccentricity", "log_area")


def outline_descriptors(mask: np.ndarray) -> dict[str, float]:
    """Shape descriptors of one nodule outline (an (H, W) mask): solidity (area over convex area), circularity
    (4 pi area / perimeter^2), eccentricity and log area in pixels.

    Example:
        >>> rows, cols = np.ogrid[:40, :40]
        >>> disc = (rows - 20) ** 2 + (cols - 20) ** 2 <= 100
        >>> round(outline_descriptors(disc)["solidity"], 2)
        0.93
    """
    from skimage.measure import label, regionprops

    region = max(regionprops(label(np.asarray(mask) > 0)), key=lambda r: r.area)
    return {"solidity": float(region.solidity),
            "circularity": float(4 * np.pi * region.area / max(region.perimeter, 1.0) ** 2),
            "eccentricity": float(region.eccentricity), "log_area": float(np.log(region.area))}


def outline_signal(table: pd.DataFrame, spacing_mm: float = 0.7, seed: int = 0) -> dict:
    """How much lobulation and spiculation the LIDC consensus outlines carry, the ceiling of any judge that sees
    only the outline: per rating, the ROC AUC (<= 2 vs >= 4) of each :data:`SHAPE_DESCRIPTORS` alone and of a
    logistic regression on all of them (5-fold cross-validated), on each nodule's centre layer at ``spacing_mm``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = []
    for nodule in table.itertuples():
        layers = nodule_outline(nodule.nodule_id, (spacing_mm, spacing_mm), 2, None)
        centre = layers[:, :, layers.shape[2] // 2]
        if centre.sum() >= 10:
            rows.append({"lobulation": nodule.lobulation, "spiculation": nodule.spiculation,
                         **outline_descriptors(centre)})
    shapes = pd.DataFrame(rows)
    out = {"spacing_mm": spacing_mm, "nodules": len(shapes)}
    for rating in ("lobulation", "spiculation"):
        chosen = shapes[(shapes[rating] <= 2) | (shapes[rating] >= 4)]
        high = (chosen[rating] >= 4).to_numpy()
        single = {}
        for name in SHAPE_DESCRIPTORS:
            auc = labelled_auc(high, chosen[name])
            single[name] = float(max(auc, 1 - auc))
        model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced"))
        predicted = cross_val_predict(model, chosen[list(SHAPE_DESCRIPTORS)].to_numpy(), high, method="predict_proba",
                                      cv=StratifiedKFold(5, shuffle=True, random_state=seed))[:, 1]
        levels = rating_level(chosen[rating].to_numpy())
        extremes = (levels == 1) | (levels == 5)  # the levels the control gate requests
        out[rating] = {"low": int((~high).sum()), "high": int(high.sum()), "single": single,
                       "all_descriptors": float(labelled_auc(high, predicted)),
                       "extremes": {"low": int((levels == 1).sum()), "high": int((levels == 5).sum()),
                                    "all_descriptors": float(labelled_auc(high[extremes], predicted[extremes]))}}
    return out


def run_data_layer(out: str | Path, seed: int = 0) -> dict:
    """Measure the data layer and write its report into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"lung_dice": lung_dice({64: 200, 128: 200, 256: 100, 512: 20}, seed),
              "speed": speed(1000, seed),
              "ratings": rating_distributions(3000, seed),
              "vessels": vessel_statistics(50, seed),
              "outline_signal": outline_signal(usable_nodule_table(), seed=seed),
              "appearance_signal": appearance_signal(usable_nodule_table(), seed=seed)}
    nodule_gallery(out / "nodule_gallery.png", seed)
    vessel_closeups(out / "vessel_closeups.png", seed)
    (out / "data_layer.json").write_text(json.dumps(report, indent=1))
    (out / "data_layer.md").write_text(markdown(report))
    return report
