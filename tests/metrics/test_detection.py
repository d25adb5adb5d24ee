"""Lesion-level detection metrics on inputs whose FROC and CPM are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from monai.metrics import compute_froc_curve_data
from scipy import ndimage

from lsdm_aug.metrics.detection import (LUNA16_FP_RATES, Candidate, CaseDetections, detect_case, dice, froc,
                                        score_at_rate, sensitivity_by_group)


def _square(shape, top, left, size=3, value=1.0):
    array = np.zeros(shape)
    array[top:top + size, left:left + size] = value
    return array


def test_candidates_hits_false_positives_and_duplicate_hits():
    reference = (_square((40, 40), 5, 5) + 2 * _square((40, 40), 25, 25, 4)).astype(np.uint8)
    probability = (_square((40, 40), 5, 5, 2, 0.9) + _square((40, 40), 27, 27, 1, 0.7)
                   + _square((40, 40), 25, 25, 1, 0.8) + _square((40, 40), 15, 30, 2, 0.6) + _square((40, 40), 0, 35, 1, 0.3))
    case = detect_case(probability, reference)
    # lesion 2 is hit twice: the 0.8 candidate counts, the 0.7 one is ignored; 0.3 is below the threshold
    assert case.candidates == [Candidate(0.9, 1), Candidate(0.8, 2), Candidate(0.6, 0)]
    assert case.lesions == [1, 2]
    with pytest.raises(ValueError, match="differ in shape"):
        detect_case(probability, reference[:-1])


def test_froc_and_cpm_worked_by_hand():
    # 2 images, 4 lesions. Scores: 0.9 TP, 0.8 FP, 0.7 TP, 0.6 FP, 0.5 FP, 0.4 TP; one lesion never found.
    first = CaseDetections([Candidate(0.9, 1), Candidate(0.8, 0), Candidate(0.5, 0)], [1, 2])
    second = CaseDetections([Candidate(0.7, 1), Candidate(0.6, 0), Candidate(0.4, 2)], [1, 2])
    result = froc([first, second])
    # operating points (FPs per image, sensitivity): (0, .25) (.5, .25) (.5, .5) (1, .5) (1.5, .5) (1.5, .75)
    assert result.fps_per_image.tolist() == [0.0, 0.5, 1.0, 1.5]
    assert result.sensitivity.tolist() == [0.25, 0.5, 0.5, 0.75]
    expected = {0.125: 0.3125, 0.25: 0.375, 0.5: 0.5, 1.0: 0.5, 2.0: 0.75, 4.0: 0.75, 8.0: 0.75}
    assert result.at_rates == pytest.approx(expected)
    assert result.cpm == pytest.approx(np.mean(list(expected.values())))
    assert tuple(result.at_rates) == LUNA16_FP_RATES


def test_a_binary_segmentation_keeps_its_operating_point():
    reference = _square((30, 30), 2, 2).astype(np.uint8) + _square((30, 30), 20, 20).astype(np.uint8)
    prediction = _square((30, 30), 2, 2) + _square((30, 30), 10, 10)  # one hit, one false positive, all at 1.0
    case = detect_case(prediction, reference)
    result = froc([case])
    assert result.at_rates[1.0] == 0.5 and result.at_rates[8.0] == 0.5
    # MONAI's CAMELYON-derived curve drops the only score as a threshold and reports nothing found
    fps, sensitivity = compute_froc_curve_data(np.array([1.0]), np.array([1.0]), num_targets=2, num_images=1)
    assert sensitivity.max() == 0.0


def test_sensitivity_by_malignancy_and_dice():
    cases = [CaseDetections([Candidate(0.9, 1), Candidate(0.3, 2)], [1, 2]), CaseDetections([Candidate(0.8, 1)], [1])]
    groups = [{1: 5, 2: 2}, {1: 2}]
    assert sensitivity_by_group(cases, groups, threshold=0.5) == {2: 0.5, 5: 1.0}
    assert dice(_square((10, 10), 0, 0, 4), _square((10, 10), 0, 0, 2)) == pytest.approx(2 * 4 / 20)
    assert dice(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    with pytest.raises(ValueError, match="needs images with reference lesions"):
        froc([CaseDetections([Candidate(0.5, 0)], [])])


def test_a_component_smeared_over_the_slice_finds_nothing():
    reference = _square((40, 40), 3, 3).astype(np.uint8)
    everywhere = np.full((40, 40), 0.7)
    case = detect_case(everywhere, reference)
    assert case.candidates == [Candidate(0.7, 0)]  # its centre (19.5, 19.5) is far from the lesion
    off_centre = _square((40, 40), 3, 3, 3, 0.9) + _square((40, 40), 6, 6, 1, 0.9)  # touching, centre 1 px off
    assert detect_case(off_centre, reference).candidates[0].lesion == 1


def test_instance_maps_keep_their_lesion_ids():
    reference = (_square((30, 30), 2, 2) * 3 + _square((30, 30), 20, 20) * 5).astype(np.uint8)
    probability = _square((30, 30), 20, 20, 3, 0.8)
    case = detect_case(probability, reference, instances=True)
    assert case.lesions == [3, 5] and case.candidates == [Candidate(0.8, 5)]
    assert detect_case(probability, reference).lesions == [1, 2]  # connected components, numbered anew


def test_peak_candidates_rank_an_under_confident_map():
    """Every value far below the threshold: components find nothing, peaks still rank the lesion first."""
    reference = _square((40, 40), 10, 10, 3).astype(np.uint8)
    probability = np.random.default_rng(0).uniform(0, 1e-12, (40, 40))  # network output is never exactly flat
    probability[11, 11] = 3e-9  # the lesion's peak
    probability[30, 30] = 2e-9  # a weaker false peak
    probability[30:32, 5:8] = 1e-9  # a plateau: one candidate, not six
    assert detect_case(probability, reference).candidates == []
    case = detect_case(probability, reference, peaks=8)
    assert len(case.candidates) == 8 and [c.lesion for c in case.candidates[:3]] == [1, 0, 0]
    assert [c.score for c in case.candidates[:3]] == pytest.approx([3e-9, 2e-9, 1e-9])
    assert case.candidates[3].score < 1e-12
    assert froc([case]).cpm == 1.0
    assert case.true_positives(0.5) == set()  # nothing at the operating threshold
    assert len(detect_case(probability, reference, peaks=2).candidates) == 2  # only the highest peaks
    with pytest.raises(ValueError, match="peaks must be >= 0 and peak_distance >= 1, got -1 and 2"):
        detect_case(probability, reference, peaks=-1)


def test_score_at_rate_is_the_froc_operating_point():
    cases = [CaseDetections([Candidate(0.9, 1), Candidate(0.6, 0), Candidate(0.4, 2)], [1, 2]),
             CaseDetections([Candidate(0.7, 0), Candidate(0.3, 0)], [])]
    assert score_at_rate(cases, 0.5) == 0.7  # one FP over two images
    assert score_at_rate(cases, 1.0) == 0.4  # two FPs over two images: both lesions found
    assert score_at_rate(cases, 0.0) == 0.9
    assert score_at_rate([CaseDetections([Candidate(0.9, 0)], [1])], 0.5) == float("inf")
    assert sensitivity_by_group(cases, [{1: "a", 2: "b"}, {}], score_at_rate(cases, 1.0)) == {"a": 1.0, "b": 1.0}


def test_froc_single_pass_matches_the_threshold_by_threshold_definition():
    """froc and score_at_rate sweep sorted candidates once; every threshold must still give the FP and
    lesion counts that CaseDetections reports for it, including tied scores and repeat hits."""
    rng = np.random.default_rng(3)
    cases = []
    for _ in range(12):
        lesions = list(range(1, int(rng.integers(0, 4)) + 1))
        candidates = [Candidate(float(rng.choice([0.1, 0.3, 0.5, 0.7, 0.9])),  # tied scores on purpose
                                int(rng.choice([0, *lesions])) if lesions else 0)
                      for _ in range(int(rng.integers(0, 6)))]
        cases.append(CaseDetections(sorted(candidates, key=lambda c: -c.score), lesions))
    total = sum(len(c.lesions) for c in cases)
    best = {0.0: 0.0}
    for threshold in {c.score for case in cases for c in case.candidates}:
        fp = sum(case.false_positives(threshold) for case in cases) / len(cases)
        found = sum(len(case.true_positives(threshold)) for case in cases) / total
        best[fp] = max(best.get(fp, 0.0), found)
    result = froc(cases)
    np.testing.assert_allclose(result.fps_per_image, sorted(best))
    np.testing.assert_allclose(result.sensitivity, [best[fp] for fp in sorted(best)])
    for rate in (0.25, 0.5, 1.0, 2.0):
        expected = min((t for t in {c.score for case in cases for c in case.candidates}
                        if sum(case.false_positives(t) for case in cases) / len(cases) <= rate), default=float("inf"))
        assert score_at_rate(cases, rate) == expected


@pytest.mark.parametrize("shape", [(40, 50), (3, 20, 30)])
def test_per_label_maxima_centres_and_sizes_are_ndimages(shape):
    """The per-label figures detect_case ranks and matches by, over labelled pixels only, equal scipy's."""
    from lsdm_aug.metrics.detection import _label_centres, _label_maxima

    rng = np.random.default_rng(3)
    values = rng.random(shape)
    labels, count = ndimage.label(rng.random(shape) > 0.7)
    ids = range(1, count + 1)
    np.testing.assert_array_equal(_label_maxima(values, labels, count), ndimage.maximum(values, labels, ids))
    centres, sizes = _label_centres(labels, ids)
    np.testing.assert_allclose(centres, ndimage.center_of_mass(np.ones(shape), labels, ids), rtol=1e-12)
    np.testing.assert_array_equal(sizes, ndimage.sum(np.ones(shape), labels, ids))
    instance_ids = [2, 5]  # an instance map's own ids, not 1..n
    instances = np.where(labels == 1, 5, np.where(labels == 2, 2, 0))
    centres, sizes = _label_centres(instances, instance_ids)
    np.testing.assert_allclose(centres, ndimage.center_of_mass(np.ones(shape), instances, instance_ids), rtol=1e-12)
    empty = np.zeros(shape, int)  # nothing above the threshold, no lesion
    assert _label_maxima(values, empty, 0).shape == (0,) and _label_centres(empty, [])[0].shape == (0, len(shape))
