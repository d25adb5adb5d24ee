"""Scoring the detection benchmark's runs: lesion-level figures of one run on the test set, their spread over
seeds, and paired bootstrap intervals over test patients.

A paired difference between two arms resamples the test *patients* (with replacement, all their slices
together) and the *seeds* (with replacement, the same draw for both arms: same seed, same initial weights and
batches), recomputes each drawn seed's CPM of both arms on the resampled patients, and takes the difference of
the seed means; its 2.5 and 97.5 percentiles are the 95 % interval. Resampling the seeds carries the spread
between training runs into the interval: one seed on the same data trains the same network, but the smallest change
of the data (one pixel of 48 synthetic cases) moved an arm's seeds' CPMs by up to 0.05, so patients alone would
call differences of that size resolved. A difference is resolved when its interval excludes 0.

Example:
    >>> from lsdm_aug.metrics.detection import Candidate, CaseDetections
    >>> hit, miss = CaseDetections([Candidate(0.9, 1)], [1]), CaseDetections([Candidate(0.9, 0)], [1])
    >>> better = {"runs": [[hit, hit]]}; worse = {"runs": [[miss, hit]]}
    >>> interval = paired_difference(better, worse, ["a", "b"], resamples=200, seed=0)
    >>> interval["mean"] > 0
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lsdm_aug.config import rating_level
from lsdm_aug.data.nnunet_format import read_label
from lsdm_aug.metrics.detection import CaseDetections, detect_case, dice, froc, score_at_rate, sensitivity_by_group

__all__ = ["evaluate", "summary", "paired_difference", "bootstrap_cpm", "size_group"]


def _foreground(predictions: Path | int, case_id: str, shape: tuple[int, ...], noise) -> np.ndarray:
    if noise is not None:
        return noise.uniform(0.0, 1e-3, shape)
    with np.load(Path(predictions) / f"{case_id}.npz", allow_pickle=False) as arrays:
        # the foreground channels themselves: 1 - background loses probabilities below float precision
        return arrays["probabilities"][1:].astype(np.float64).sum(0).reshape(shape)


def evaluate(test: Path, predictions: Path | int, threshold: float, peaks: int = 0,
             operating_fps: float = 2.0) -> tuple[dict[str, Any], list[CaseDetections]]:
    """Lesion-level detection figures of one trained model on the test set, and its per-slice detections (in
    the order of the test set's case ids, for the bootstrap).

    ``predictions``: the folder of nnU-Net's ``.npz`` probabilities, or an integer seed for the chance level
    (uniform noise as the foreground probability: candidates at random places). Candidates are the ``peaks``
    highest local maxima of each slice's foreground probability (0: connected components above
    ``threshold``). Sensitivity, false positives and Dice are read at ``threshold``; the per-malignancy
    sensitivity also at the score where the FROC reaches ``operating_fps`` per slice."""
    lesions = pd.read_csv(test / "lesions.csv")
    cases, groups, sizes, fps, predicted, reference = [], [], [], [], [], []
    noise = np.random.default_rng(predictions) if isinstance(predictions, int) else None
    for case_id in sorted(lesions.case_id.unique()):
        instances, spacing = read_label(test, case_id)
        foreground = _foreground(predictions, case_id, instances.shape, noise)
        case = detect_case(foreground, instances, threshold, instances=True, peaks=peaks)
        cases.append(case)
        rows = lesions[(lesions.case_id == case_id) & (lesions.lesion > 0)]
        groups.append({int(r.lesion): rating_level(r.malignancy) for r in rows.itertuples()})
        sizes.append({int(r.lesion): size_group(instances == r.lesion, spacing) for r in rows.itertuples()})
        predicted.append((foreground >= threshold).ravel())
        reference.append((instances > 0).ravel())
        fps.append(case.false_positives(threshold))
    result = froc(cases)
    operating = score_at_rate(cases, operating_fps)
    figures = {"cpm": result.cpm, "sensitivity_at": {str(k): v for k, v in result.at_rates.items()},
               "sensitivity": sum(len(c.true_positives(threshold)) for c in cases) / max(result.lesions, 1),
               "false_positives_per_slice": float(np.mean(fps)),
               "dice": dice(np.concatenate(predicted), np.concatenate(reference)),  # over the whole test set
               "sensitivity_by_malignancy": {str(k): v for k, v in
                                             sensitivity_by_group(cases, groups, threshold).items()},
               "sensitivity_by_malignancy_at_operating_point": {
                   str(k): v for k, v in sensitivity_by_group(cases, groups, operating).items()},
               "sensitivity_by_size": {k: v for k, v in sensitivity_by_group(cases, sizes, threshold).items()},
               "sensitivity_by_size_at_operating_point": {
                   k: v for k, v in sensitivity_by_group(cases, sizes, operating).items()},
               "operating_score": operating if np.isfinite(operating) else None,  # None: no candidate fits the rate
               "froc": {"fps_per_slice": result.fps_per_image.tolist(), "sensitivity": result.sensitivity.tolist()},
               "lesions": result.lesions, "slices": result.images}
    return figures, cases


SIZE_GROUPS_MM = (6.0, 10.0)  # lesion diameter bins: < 6, 6-10, >= 10 mm


def size_group(mask: np.ndarray, spacing: tuple[float, ...]) -> str:
    """A lesion's diameter bin (its area's equivalent circle on the labelled slice, in mm), e.g. ``"6-10 mm"``."""
    diameter = 2.0 * np.sqrt(float(mask.sum()) * float(spacing[0]) * float(spacing[1]) / np.pi)
    low, high = SIZE_GROUPS_MM
    return f"< {low:g} mm" if diameter < low else f"{low:g}-{high:g} mm" if diameter < high else f">= {high:g} mm"


def summary(runs: list[dict]) -> dict[str, Any]:
    """Mean and std over seeds of each figure of :func:`evaluate`."""
    def spread(values: list[float]) -> dict[str, float]:
        return {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values))}

    keys = ("cpm", "sensitivity", "false_positives_per_slice", "dice")
    out = {k: spread([r[k] for r in runs]) for k in keys}
    levels = sorted({level for r in runs for level in r["sensitivity_by_malignancy"]})
    for key in ("sensitivity_by_malignancy", "sensitivity_by_malignancy_at_operating_point"):
        out[key] = {level: spread([r[key].get(level, np.nan) for r in runs]) for level in levels}
    for key in ("sensitivity_by_size", "sensitivity_by_size_at_operating_point"):
        groups = sorted({group for r in runs for group in r.get(key, {})})
        if groups:
            out[key] = {group: spread([r[key].get(group, np.nan) for r in runs]) for group in groups}
    out["sensitivity_at"] = {rate: spread([r["sensitivity_at"][rate] for r in runs])
                             for rate in runs[0]["sensitivity_at"]}
    return out


def _resamples(patients: Sequence[str], count: int, seed: int) -> list[np.ndarray]:
    """``count`` bootstrap resamples of the test slices, as slice positions, drawn patient-wise."""
    patients = np.asarray(patients)
    names = np.unique(patients)
    slices_of = {name: np.flatnonzero(patients == name) for name in names}
    rng = np.random.default_rng(seed)
    return [np.concatenate([slices_of[name] for name in rng.choice(names, len(names))]) for _ in range(count)]


def _seed_draws(seeds: int, count: int, seed: int) -> np.ndarray:
    """``count`` bootstrap draws of ``seeds`` seed positions (with replacement), one row per resample."""
    return np.random.default_rng([seed, 1]).integers(0, seeds, size=(count, seeds))


def bootstrap_cpm(arm: dict[str, Any], resamples: list[np.ndarray], seed_draws: np.ndarray | None = None
                  ) -> np.ndarray:
    """Seed-mean CPM of one arm (``arm["runs"]``: each seed's per-slice detections) on each resample of the
    patients, over the seeds ``seed_draws[k]`` drawn for resample ``k`` (None: every seed once); a resample
    without lesions is NaN."""
    per_seed = np.full((len(resamples), len(arm["runs"])), np.nan)
    for k, positions in enumerate(resamples):
        for s, cases in enumerate(arm["runs"]):
            chosen = [cases[p] for p in positions]
            if sum(len(c.lesions) for c in chosen):
                per_seed[k, s] = froc(chosen).cpm
    if seed_draws is not None:
        per_seed = np.take_along_axis(per_seed, seed_draws, axis=1)
    with warnings.catch_warnings():  # a resample without lesions: NaN, not numpy's "mean of empty slice"
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(per_seed, axis=1)


def paired_difference(arm: dict[str, Any], baseline: dict[str, Any], patients: Sequence[str],
                      resamples: int = 1000, seed: int = 0, cache: dict | None = None,
                      names: tuple[str, str] | None = None) -> dict[str, Any]:
    """CPM of ``arm`` minus ``baseline`` (seed means) with a paired bootstrap 95 % interval over the test
    patients and the seeds.

    ``arm`` / ``baseline``: ``{"runs": [per-slice detections of each seed, same seeds in the same order]}``;
    ``patients``: each test slice's patient. With ``names`` (the two arms' names), ``cache`` keeps the resamples and
    each named arm's bootstrap CPMs for the next comparison (same ``patients``, ``resamples`` and ``seed``)."""
    if len(arm["runs"]) != len(baseline["runs"]):
        raise ValueError(f"paired arms need the same seeds, got {len(arm['runs'])} and {len(baseline['runs'])} runs")
    observed = (np.mean([froc(c).cpm for c in arm["runs"]]) - np.mean([froc(c).cpm for c in baseline["runs"]]))
    seed_differences = [froc(a).cpm - froc(b).cpm for a, b in zip(arm["runs"], baseline["runs"])]
    result = {"mean": float(observed), "seed_differences": [float(d) for d in seed_differences],
              "resamples": int(resamples), "resampled": "patients and seeds"}
    if resamples:
        cache = {} if cache is None or names is None else cache
        if "resamples" not in cache:
            cache["resamples"] = _resamples(patients, resamples, seed)
            cache["seed_draws"] = _seed_draws(len(arm["runs"]), resamples, seed)
        a, b = (cache[name] if name in cache else bootstrap_cpm(runs, cache["resamples"], cache["seed_draws"])
                for name, runs in zip(names or ("", ""), (arm, baseline)))
        if names is not None:
            cache.update(zip(names, (a, b)))
        low, high = np.nanpercentile(a - b, [2.5, 97.5])
        result |= {"low": float(low), "high": float(high), "resolved": bool(low > 0 or high < 0)}
    return result
