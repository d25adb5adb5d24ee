"""``run_detection``: build the data, profile an iteration, train and predict every (arm, seed), score them, and
write the report; then the scarce-data curve (``curve_train_patients``), each size in its own work folder.

Example:
    >>> report = run_detection(load_detection_recipe("bench-detection-phantom"), "work/detection",
    ...                        "reports/detection")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pandas as pd

from lsdm_aug.benchmarks.detection import data, diagnosis, runs, scoring
from lsdm_aug.benchmarks.detection.recipe import DetectionRecipe
from lsdm_aug.benchmarks.detection.report import detection_markdown, save_curve_png, save_froc_png
from lsdm_aug.data.prepared import atomic_write_text

__all__ = ["run_detection", "train_arms"]

BASELINES = ("real", "real+copy-paste")


def _prepare(recipe: DetectionRecipe, work: Path, arms: tuple[str, ...]) -> None:
    """The datasets of ``arms``, preprocessed, with the reduced configuration in every plan."""
    raw, test = work / "raw", work / "test"
    real_cases = data.write_real(recipe, raw, test)
    for arm in arms:
        if arm in ("real+synthetic", "real+synthetic-unguided"):
            data.write_synthetic_arm(recipe, raw, work, real_cases, arm)
        elif arm == "real+copy-paste":
            data.write_copy_paste_arm(recipe, raw, real_cases)
        elif arm == "real+on-the-fly":
            data.ensure_bank(recipe, work)
    # one budget for every arm: without a recipe batch size, the batch nnU-Net plans for the real set (it plans
    # larger batches for the larger synthetic sets)
    names = {data.dataset_name(recipe, arm) for arm in arms} | {data.dataset_name(recipe, "real")}
    plans = {name: runs.preprocess(work, name, recipe.ct_window) for name in sorted(names)}
    planned = int(plans[data.dataset_name(recipe, "real")]["configurations"]["2d"]["batch_size"])
    for name in sorted(names):
        runs.write_reduced_configuration(replace(recipe, batch_size=recipe.batch_size or planned), work, name,
                                         plans[name])
    record = work / "planned.json"
    earlier = json.loads(record.read_text()) if record.is_file() else {}
    atomic_write_text(record, json.dumps({"planned_batch_size": planned,
                                          "lsdm_model": earlier.get("lsdm_model") or _model_id(recipe)}))


def _model_id(recipe: DetectionRecipe) -> str:
    """The id (name, steps, weights digest) of the model the LSDM arms are made with, when the work folder's data
    is first made: a later default model does not relabel data an earlier one made."""
    from lsdm_aug.pipeline import LSDMPipeline

    return LSDMPipeline.from_pretrained(recipe.model, device="cpu").model_id


def train_arms(recipe: DetectionRecipe, work: Path, arms: tuple[str, ...]) -> dict[str, Any]:
    """Make the datasets of ``arms`` in ``work``, then train, predict and score every seed (:func:`_train_and_score`)."""
    _prepare(recipe, work, arms)
    return _train_and_score(recipe, work, arms)


def _train_and_score(recipe: DetectionRecipe, work: Path, arms: tuple[str, ...]) -> dict[str, Any]:
    """Train, predict and score every seed of ``arms`` on datasets already prepared; per arm its runs' figures,
    their summary and each seed's per-slice detections (``detections``, not saved)."""
    folders = runs.train_and_predict_all(recipe, work, [(arm, seed) for arm in arms for seed in recipe.seeds])
    out: dict[str, Any] = {}
    for arm in arms:
        figures, detections = [], []
        for seed in recipe.seeds:
            predictions = folders[(arm, seed)]
            result, cases = scoring.evaluate(work / "test", predictions, recipe.threshold,
                                             recipe.candidates_per_slice, recipe.operating_fps)
            figures.append(result | {"seed": seed} | runs.run_minutes(predictions))
            detections.append(cases)
        out[arm] = {"runs": figures, "summary": scoring.summary(figures), "detections": detections}
    return out


def _comparisons(recipe: DetectionRecipe, arms: dict[str, Any], patients: list[str], cache: dict
                 ) -> list[dict[str, Any]]:
    """Each arm's paired CPM difference against real only and against copy-paste (when run), and guided LSDM cases
    against unguided ones (the value of control)."""
    pairs = [(arm, baseline) for baseline in BASELINES if baseline in arms for arm in arms
             if arm != baseline and not (baseline == "real+copy-paste" and arm == "real")]
    if {"real+synthetic", "real+synthetic-unguided"} <= set(arms):
        pairs.append(("real+synthetic", "real+synthetic-unguided"))
    return _paired_differences(recipe, arms, pairs, patients, cache)


def _paired_differences(recipe: DetectionRecipe, arms: dict[str, Any], pairs: list[tuple[str, str]],
                        patients: list[str], cache: dict, size: int | None = None) -> list[dict[str, Any]]:
    """Each (arm, baseline) pair's paired CPM difference (:func:`scoring.paired_difference`). ``cache`` serves every
    comparison on the test patients, so an arm's bootstrap CPMs are computed once; arms of another training-set
    size than the main recipe's are kept in it under (``size``, arm)."""
    out = []
    for arm, baseline in pairs:
        names = (arm, baseline) if size is None else ((size, arm), (size, baseline))
        difference = scoring.paired_difference({"runs": arms[arm]["detections"]}, {"runs": arms[baseline]["detections"]},
                                               patients, recipe.bootstrap, recipe.data_seed, cache, names)
        out.append({"arm": arm, "baseline": baseline, **difference})
    return out


def _diagnosis(recipe: DetectionRecipe, work: Path) -> dict[str, Any]:
    """The real training nodules and each synthetic or copy-paste arm's added ones against the test nodules."""
    arms = ["real", *(arm for arm in recipe.arms if arm in diagnosis.ADDED_CASES)]
    return diagnosis.diagnose(work, {arm: data.dataset_name(recipe, arm) for arm in arms}, recipe.data_seed)


def _chance(recipe: DetectionRecipe, test: Path) -> dict[str, Any]:
    chance = [scoring.evaluate(test, seed, recipe.threshold, recipe.candidates_per_slice, recipe.operating_fps)[0]
              for seed in recipe.seeds]
    return {"runs": chance, "summary": scoring.summary(chance)}


def _curve(recipe: DetectionRecipe, work: Path, main: dict[str, Any], patients: list[str], cache: dict
           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """CPM per real training-set size and curve arm (the main size from the main runs), and at each size every
    other curve arm's paired CPM difference against real only (:func:`_curve_comparisons`)."""
    points, by_size = [], {}
    for size in sorted({recipe.train_patients, *recipe.curve_train_patients}):
        if size == recipe.train_patients:
            arms = {arm: main[arm] for arm in recipe.curve_arms if arm in main}
            missing = tuple(arm for arm in recipe.curve_arms if arm not in main)
            if missing:
                arms |= train_arms(recipe, work, missing)
        else:
            arms = train_arms(replace(recipe, train_patients=size), work / f"train{size}", recipe.curve_arms)
        by_size[size] = arms
        for arm, result in arms.items():
            points.append({"train_patients": size, "arm": arm, "cpm": result["summary"]["cpm"],
                           "sensitivity": result["summary"]["sensitivity"],
                           "minutes": sum(r["minutes"] or 0 for r in result["runs"])})
    return points, _curve_comparisons(recipe, by_size, patients, cache)


def _curve_comparisons(recipe: DetectionRecipe, by_size: dict[int, dict[str, Any]], patients: list[str],
                       cache: dict | None = None) -> list[dict[str, Any]]:
    """At each training-set size of ``by_size`` (size -> arm -> result with ``detections``), each arm's paired CPM
    difference against real only: how much it helps when real data is scarce, with its bootstrap interval. At the
    main recipe's size the arms are the main runs, whose bootstrap CPMs ``cache`` may already hold."""
    cache = {} if cache is None else cache
    out = []
    for size, arms in sorted(by_size.items()):
        pairs = [(arm, "real") for arm in arms if arm != "real" and "real" in arms]
        key = None if size == recipe.train_patients else size
        out += [{"train_patients": size, **c} for c in _paired_differences(recipe, arms, pairs, patients, cache, key)]
    return out


def run_detection(recipe: DetectionRecipe, work_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """The whole benchmark (see :mod:`lsdm_aug.benchmarks.detection`); writes ``detection.md`` / ``.json``,
    ``froc.png`` and, with a curve, ``scarce_curve.png`` into ``out_dir``. Rerun to continue: finished (arm, seed)
    runs are kept."""
    recipe.validate()
    started = time.perf_counter()
    work, out = Path(work_dir).resolve(), Path(out_dir)
    _prepare(recipe, work, recipe.arms)
    data_minutes = (time.perf_counter() - started) / 60
    profile = runs.profile(recipe, work, "real")
    arms = _train_and_score(recipe, work, recipe.arms)
    lesions = pd.read_csv(work / "test" / "lesions.csv")
    patients = lesions.drop_duplicates("case_id").sort_values("case_id").patient_id.astype(str).tolist()
    bootstrap_cache: dict = {}  # the test patients' resamples and each arm's bootstrap CPMs, for every comparison
    report: dict[str, Any] = {
        "recipe": asdict(recipe), "cpu_count": os.cpu_count(), "profile": profile,
        **{k: v for k, v in json.loads((work / "planned.json").read_text()).items()
           if k in ("planned_batch_size", "lsdm_model")},
        "arms": {arm: {k: v for k, v in result.items() if k != "detections"} for arm, result in arms.items()},
        "comparisons": _comparisons(recipe, arms, patients, bootstrap_cache), "chance": _chance(recipe, work / "test"),
        "test_patients": len(set(patients))}
    report["diagnosis"] = _diagnosis(recipe, work)
    if recipe.curve_train_patients:
        report["curve"], report["curve_comparisons"] = _curve(recipe, work, arms, patients, bootstrap_cache)
    report |= {"data_minutes": data_minutes, "wall_minutes": (time.perf_counter() - started) / 60}
    out.mkdir(parents=True, exist_ok=True)
    save_froc_png(report, out / "froc.png")
    if "curve" in report:
        save_curve_png(report, out / "scarce_curve.png")
    atomic_write_text(out / "detection.json", json.dumps(report, indent=1))
    atomic_write_text(out / "detection.md", detection_markdown(report))
    return report
