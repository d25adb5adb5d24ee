"""Lesion-level detection metrics from segmentation output: candidates, matching, FROC and CPM (LUNA16).

A segmentation becomes detection candidates by connected components of the thresholded foreground
probability, each scored by its highest probability and located at its centroid. As in LUNA16, a
candidate hits a reference lesion when its centre lies within the lesion's radius of the lesion's
centre (the radius of a disc of the lesion's area, at least ``MIN_RADIUS_PX`` = 2 px so that one- and
two-pixel nodules of low-resolution slices can be hit at all); a component smeared over the slice
therefore does not count as finding what it covers. The best-scored hit of a lesion is its true
positive, further hits of the same lesion are ignored (neither true nor false positive), and
candidates hitting nothing are false positives.

FROC: sensitivity against the mean number of false positives per image (slice or scan), with every
distinct candidate score as a threshold. CPM (competition performance metric, LUNA16) is the mean
sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per image, read off the curve by linear
interpolation. MONAI's ``compute_froc_score`` defaults to CAMELYON16's rates (1/4 .. 8), and its
``compute_froc_curve_data`` drops the lowest score as a threshold, which loses the only operating point
of a binary segmentation; hence this module.

Example:
    >>> import numpy as np
    >>> reference = np.zeros((32, 32), np.uint8); reference[4:8, 4:8] = 1
    >>> probability = np.zeros((32, 32)); probability[5:7, 5:7] = 0.9; probability[20:22, 20:22] = 0.6
    >>> case = detect_case(probability, reference)
    >>> [(round(c.score, 1), c.lesion) for c in case.candidates]
    [(0.9, 1), (0.6, 0)]
    >>> round(froc([case]).cpm, 3)
    1.0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = ["LUNA16_FP_RATES", "MIN_RADIUS_PX", "Candidate", "CaseDetections", "FROCResult", "detect_case", "froc", "dice",
           "score_at_rate", "sensitivity_by_group"]

LUNA16_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MIN_RADIUS_PX = 2.0


@dataclass(frozen=True)
class Candidate:
    """A detection: its score and the reference lesion it hits (1..n), 0 for a false positive.

    Example:
        >>> Candidate(score=0.9, lesion=0)  # a false positive
        Candidate(score=0.9, lesion=0)
    """

    score: float
    lesion: int


@dataclass
class CaseDetections:
    """One image's candidates (best score first) and its reference lesions' ids (1..n).

    Example:
        >>> case = CaseDetections([Candidate(0.9, 1), Candidate(0.4, 0)], lesions=[1, 2])
        >>> case.true_positives(0.5), case.false_positives(0.3)
        ({1}, 1)
    """

    candidates: list[Candidate]
    lesions: list[int] = field(default_factory=list)

    def true_positives(self, threshold: float = 0.0) -> set[int]:
        return {c.lesion for c in self.candidates if c.lesion and c.score >= threshold}

    def false_positives(self, threshold: float = 0.0) -> int:
        return sum(1 for c in self.candidates if not c.lesion and c.score >= threshold)


def detect_case(probability: np.ndarray, reference: np.ndarray, threshold: float = 0.5,
                instances: bool = False, peaks: int = 0, peak_distance: int = 2) -> CaseDetections:
    """Candidates of a foreground ``probability`` map (2D or 3D) matched against a ``reference`` label (> 0).

    Reference lesions are the connected components of ``reference > 0``, or, with ``instances``, the
    reference's own values 1..n (an instance map: lesion ids stay those of the reference).

    Candidates are the connected components of ``probability >= threshold``; with ``peaks`` > 0 they are
    instead the ``peaks`` highest local maxima of the probability (within ``peak_distance`` px; a plateau is
    one maximum), whatever their value: the FROC then ranks a network's output even where it never reaches
    the threshold (an under-confident model), while sensitivity and false positives at ``threshold`` count the
    same peaks (a blob with several maxima farther apart than ``peak_distance``, off any lesion, is several false
    positives, so these counts are not those of the component mode)."""
    probability, reference = np.asarray(probability, float), np.asarray(reference)
    if probability.shape != reference.shape:
        raise ValueError(f"probability {probability.shape} and reference {reference.shape} differ in shape")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    if instances:
        lesion_ids = [int(v) for v in np.unique(reference) if v > 0]
        lesions = reference.astype(int)
    else:
        lesions, count = ndimage.label(reference > 0)
        lesion_ids = list(range(1, count + 1))
    n_lesions = len(lesion_ids)
    if peaks < 0 or peak_distance < 1:
        raise ValueError(f"peaks must be >= 0 and peak_distance >= 1, got {peaks} and {peak_distance}")
    components, n_components = ndimage.label(_local_maxima(probability, peaks, peak_distance) if peaks
                                             else probability >= threshold)
    scores = _label_maxima(probability, components, n_components)
    centres, _ = _label_centres(components, range(1, n_components + 1))
    lesion_centres, areas = _label_centres(lesions, lesion_ids)
    radii = np.maximum(np.sqrt(np.asarray(areas) / np.pi) if probability.ndim == 2
                       else np.cbrt(np.asarray(areas) * 3 / (4 * np.pi)), MIN_RADIUS_PX)
    found, claimed = [], set()
    for index in np.argsort(-np.asarray(scores), kind="stable"):
        distance = np.linalg.norm(lesion_centres - centres[index], axis=1) if n_lesions else np.zeros(0)
        within = [lesion_ids[k] for k in np.argsort(distance) if distance[k] <= radii[k]]
        free = [lesion for lesion in within if lesion not in claimed]
        if free:
            claimed.add(free[0])
            found.append(Candidate(float(scores[index]), free[0]))
        elif not within:
            found.append(Candidate(float(scores[index]), 0))
        # a candidate on an already detected lesion: ignored
    return CaseDetections(found, lesion_ids)


def _local_maxima(probability: np.ndarray, count: int, distance: int) -> np.ndarray:
    """Mask of the ``count`` highest local maxima of ``probability`` (plateaus kept whole)."""
    peak = (probability == ndimage.maximum_filter(probability, size=2 * distance + 1)) & (probability > 0)
    plateaus, n = ndimage.label(peak)
    if n > count:
        heights = _label_maxima(probability, plateaus, n)
        keep = np.argsort(-heights, kind="stable")[:count] + 1
        peak = np.isin(plateaus, keep)
    return peak


def _label_maxima(values: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """The largest of ``values`` under each label 1..``count`` of ``labels`` (what ``ndimage.maximum`` gives, over
    the labelled pixels only: ndimage sorts the whole image once per call)."""
    inside = labels > 0
    maxima = np.full(count + 1, -np.inf)
    np.maximum.at(maxima, labels[inside], values[inside])
    return maxima[1:]


def _label_centres(labels: np.ndarray, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean pixel coordinates (one row per id) and pixel counts of the labels ``ids`` of an integer ``labels``
    array (``ndimage.center_of_mass`` of ones and ``ndimage.sum``, over the labelled pixels only)."""
    ids = np.asarray(ids, dtype=np.intp)
    coordinates = np.nonzero(labels)
    index = labels[coordinates].astype(np.intp)
    length = max(int(index.max(initial=0)), int(ids.max(initial=0))) + 1
    counts = np.bincount(index, minlength=length)
    sums = np.stack([np.bincount(index, weights=axis, minlength=length) for axis in coordinates], axis=-1)
    return sums[ids] / np.maximum(counts[ids], 1)[:, None], counts[ids].astype(float)


@dataclass(frozen=True)
class FROCResult:
    """FROC curve (false positives per image, sensitivity), sensitivity at each rate, and CPM.

    Example:
        >>> froc([CaseDetections([Candidate(0.9, 1)], [1, 2])]).at_rates[1.0]
        0.5
    """

    fps_per_image: np.ndarray
    sensitivity: np.ndarray
    at_rates: dict[float, float]
    cpm: float
    lesions: int
    images: int


def _operating_points(cases: Sequence[CaseDetections]) -> tuple[list[float], list[float], list[int]]:
    """Every distinct candidate score (best first) with the mean false positives per image and the number of
    lesions found at that threshold, in one pass over the candidates sorted by score."""
    ranked = sorted(((c.score, index, c.lesion) for index, case in enumerate(cases) for c in case.candidates),
                    key=lambda item: -item[0])
    thresholds: list[float] = []
    fps: list[float] = []
    found: list[int] = []
    false_positives, hit = 0, set()
    for position, (score, index, lesion) in enumerate(ranked):
        if lesion:
            hit.add((index, lesion))  # a lesion counts once, at its best-scored hit
        else:
            false_positives += 1
        if position + 1 == len(ranked) or ranked[position + 1][0] != score:  # last candidate at this score
            thresholds.append(score)
            fps.append(false_positives / len(cases))
            found.append(len(hit))
    return thresholds, fps, found


def froc(cases: Sequence[CaseDetections], fp_rates: Sequence[float] = LUNA16_FP_RATES) -> FROCResult:
    """The FROC of ``cases`` (every distinct score a threshold) and the CPM over ``fp_rates``."""
    lesions = sum(len(c.lesions) for c in cases)
    if not cases or lesions == 0:
        raise ValueError(f"FROC needs images with reference lesions, got {len(cases)} images and {lesions} lesions")
    _, point_fps, point_found = _operating_points(cases)
    best: dict[float, float] = {0.0: 0.0}
    for fp, found in zip(point_fps, point_found):  # one point per false-positive level: the best sensitivity there
        best[fp] = max(best.get(fp, 0.0), found / lesions)
    fps_array, sensitivity_array = np.asarray(sorted(best)), np.asarray([best[fp] for fp in sorted(best)])
    # beyond the last operating point the sensitivity stays at its maximum (no more candidates to add)
    at_rates = {float(rate): float(np.interp(rate, fps_array, sensitivity_array)) for rate in fp_rates}
    return FROCResult(fps_array, sensitivity_array, at_rates, float(np.mean(list(at_rates.values()))), lesions,
                      len(cases))


def score_at_rate(cases: Sequence[CaseDetections], fps_per_image: float) -> float:
    """The lowest candidate score whose threshold keeps the mean false positives per image at or below
    ``fps_per_image`` (an FROC operating point); ``inf`` when even the best candidate is too many.

    Example:
        >>> cases = [CaseDetections([Candidate(0.9, 1), Candidate(0.5, 0), Candidate(0.2, 0)], [1])]
        >>> score_at_rate(cases, 1.0), score_at_rate(cases, 0.5)
        (0.5, 0.9)
    """
    best = float("inf")
    for threshold, fp, _ in zip(*_operating_points(cases)):
        if fp > fps_per_image:
            break
        best = threshold
    return best


def sensitivity_by_group(cases: Sequence[CaseDetections], groups: Sequence[Mapping[int, object]],
                         threshold: float = 0.5) -> dict[object, float]:
    """Per-group sensitivity at a score threshold; ``groups[i]`` maps case ``i``'s lesion ids to a group
    (e.g. malignancy level)."""
    hits: dict[object, list[int]] = {}
    for case, group in zip(cases, groups):
        found = case.true_positives(threshold)
        for lesion in case.lesions:
            hits.setdefault(group[lesion], []).append(int(lesion in found))
    return {g: float(np.mean(v)) for g, v in sorted(hits.items(), key=lambda item: str(item[0]))}


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two foreground masks; 1.0 when both are empty."""
    prediction, reference = np.asarray(prediction) > 0, np.asarray(reference) > 0
    total = prediction.sum() + reference.sum()
    return 1.0 if total == 0 else float(2 * (prediction & reference).sum() / total)
