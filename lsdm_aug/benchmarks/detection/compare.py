"""One arm of the detection benchmark run twice, in two work folders (e.g. a recipe setting on and off): the
paired CPM difference over the same seeds and the same held-out test patients.

The benchmark pairs arms within one work folder; an ablation of a recipe setting that changes an arm's data
(``appearance_from_outline``, the bank, ``synthetic_count`` ...) is run in a second work folder with the same
test set, and this compares the two runs of that arm seed for seed, with the benchmark's patient bootstrap.

Example:
    >>> from lsdm_aug.benchmarks.detection import load_detection_recipe
    >>> recipe = load_detection_recipe("bench-detection-phantom")
    >>> compare_work_folders("work/detection-b", "work/detection-a", "real+on-the-fly", recipe)  # doctest: +SKIP
    {'arm': 'real+on-the-fly', 'mean': -0.018, 'low': -0.047, 'high': 0.012, 'resolved': False, ...}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from lsdm_aug.benchmarks.detection.recipe import ARMS, DetectionRecipe
from lsdm_aug.benchmarks.detection.runs import predictions_folder
from lsdm_aug.benchmarks.detection.scoring import evaluate, paired_difference
from lsdm_aug.metrics.detection import CaseDetections

__all__ = ["compare_work_folders", "finished_seeds"]


def finished_seeds(work: Path, arm: str) -> list[int]:
    """Seeds of ``arm`` whose predictions are complete in ``work`` (their ``done.json`` written)."""
    folder = predictions_folder(work, arm, 0).parent
    if not folder.is_dir():
        return []
    return sorted(int(p.name.removeprefix("seed")) for p in folder.glob("seed*") if (p / "done.json").is_file())


def compare_work_folders(work: str | Path, against: str | Path, arm: str, recipe: DetectionRecipe) -> dict[str, Any]:
    """CPM of ``arm`` in ``work`` minus the same arm in ``against``: seed means over the seeds finished in both,
    with the paired patient-bootstrap 95 % interval (:func:`~.scoring.paired_difference`); scored as ``recipe``
    scores (threshold, candidates per slice, operating point, bootstrap resamples and seed): the recipe the two
    folders were run with.

    Raises:
        ValueError: an unknown arm, a recipe without bootstrap resamples, a folder without a test set, test sets
            that differ, or no seed finished in both folders.
    """
    if recipe.bootstrap < 1:
        raise ValueError(f"a paired comparison needs bootstrap resamples; the recipe has bootstrap = {recipe.bootstrap}")
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {list(ARMS)}, got {arm!r}")
    work, against = Path(work), Path(against)
    for folder in (work, against):
        if not (folder / "test" / "lesions.csv").is_file():
            raise ValueError(f"{str(folder)!r} holds no detection test set (test/lesions.csv); run "
                             "`lsdm-aug benchmark detection --work` there first")
    lesions = pd.read_csv(work / "test" / "lesions.csv")
    if not lesions.equals(pd.read_csv(against / "test" / "lesions.csv")):
        raise ValueError(f"{str(work)!r} and {str(against)!r} hold different test sets; a paired comparison "
                         "needs the same held-out lesions")
    seeds = sorted(set(finished_seeds(work, arm)) & set(finished_seeds(against, arm)))
    if not seeds:
        raise ValueError(f"no seed of {arm!r} is finished in both {str(work)!r} and {str(against)!r}")

    def detections(folder: Path) -> list[list[CaseDetections]]:
        return [evaluate(folder / "test", predictions_folder(folder, arm, seed), recipe.threshold,
                         recipe.candidates_per_slice, recipe.operating_fps)[1] for seed in seeds]

    patients = lesions.drop_duplicates("case_id").sort_values("case_id").patient_id.astype(str).tolist()
    difference = paired_difference({"runs": detections(work)}, {"runs": detections(against)}, patients,
                                   recipe.bootstrap, recipe.data_seed)
    return {"arm": arm, "work": str(work), "against": str(against), "seeds": seeds, **difference}
