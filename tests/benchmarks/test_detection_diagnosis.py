"""The detection benchmark's diagnosis: nodule measurements, the appearance classifier and the report's verdict."""

from __future__ import annotations

import numpy as np
import pytest

from lsdm_aug.benchmarks.detection.diagnosis import appearance_auc, diagnose, nodule_measurements
from lsdm_aug.benchmarks.detection.report import _diagnosis_lines
from lsdm_aug.data.nnunet_format import write_case


def _lung_slice(rng: np.random.Generator, nodule_hu: float, radius_px: float, centre=(40, 40), size: int = 96,
                vessel: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A square lung (-850 HU, noisy) inside tissue, one disc nodule; optionally a vessel touching it."""
    hu = rng.normal(-850, 25, (size, size)).astype(np.float32)
    lung = np.zeros((size, size), bool)
    lung[10:size - 10, 10:size - 10] = True
    hu[~lung] = 40
    rows, cols = np.ogrid[:size, :size]
    label = ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius_px ** 2).astype(np.uint8)
    if vessel:  # a 1.5 mm vessel running from the nodule to the lung's edge
        hu[centre[0] - 1:centre[0] + 2, centre[1]:size - 10] = 30
    hu[label > 0] = nodule_hu + rng.normal(0, 30, int(label.sum()))
    return hu, label, lung


def test_measurements_read_size_placement_and_vessel_contact():
    rng = np.random.default_rng(0)
    hu, label, lung = _lung_slice(rng, 20, 6, centre=(30, 48))
    alone = nodule_measurements(hu, label, 0.5, lung)[0]
    assert alone["diameter_mm"] == pytest.approx(6.0, abs=0.4)  # 12 px across at 0.5 mm
    assert alone["pleura_mm"] == pytest.approx(10.0, abs=0.6)  # 20 px from the lung's top edge
    assert alone["vessel_contact"] == 0.0 and alone["contrast_hu"] > 700
    assert alone["radial_0"] > alone["radial_5"]  # dense centre, lung beyond the edge
    touching = nodule_measurements(*_lung_slice(rng, 20, 6, centre=(30, 48), vessel=True)[:2], 0.5, lung)[0]
    assert 0.02 < touching["vessel_contact"] < 0.5
    assert nodule_measurements(hu, np.zeros_like(label), 0.5, lung) == []
    with pytest.raises(ValueError, match="spacing_mm must be > 0, got 0"):
        nodule_measurements(hu, label, 0.0, lung)


def _set(rng, count, nodule_hu):
    import pandas as pd

    rows = []
    for _ in range(count):
        hu, label, lung = _lung_slice(rng, nodule_hu + rng.normal(0, 40), rng.uniform(4, 9))
        rows += nodule_measurements(hu, label, 0.7, lung)
    return pd.DataFrame(rows)


def test_the_appearance_classifier_tells_a_density_gap_and_not_a_resample():
    rng = np.random.default_rng(1)
    real, same, brighter = _set(rng, 30, -50), _set(rng, 30, -50), _set(rng, 30, 250)
    assert appearance_auc(real, brighter) > 0.9
    assert 0.2 < appearance_auc(real, same) < 0.75
    assert appearance_auc(real, same.head(3)) is None  # fewer nodules than folds


def _real_like(rng):
    return _lung_slice(rng, -50 + rng.normal(0, 40), rng.uniform(4, 9))


def _write_work(tmp_path, rng):
    test, raw = tmp_path / "test", tmp_path / "raw"
    for k in range(12):
        write_case(test, f"test_p{k:05d}_s0", *_real_like(rng)[:2], (0.7, 0.7))
        write_case(raw / "Dataset900_real", f"train_p{k:05d}_s0", *_real_like(rng)[:2], (0.7, 0.7))
        write_case(raw / "Dataset901_realsynthetic", f"lsdm_{k:05d}", *_lung_slice(rng, 300, 6)[:2], (0.7, 0.7))
        write_case(raw / "Dataset901_realsynthetic", f"train_p{k:05d}_s0", *_real_like(rng)[:2], (0.7, 0.7))
        hu, label, _ = _real_like(rng)
        slab = np.stack([np.full_like(hu, -1000), hu, np.full_like(hu, -1000)])  # 2.5D: the middle is read
        write_case(raw / "Dataset902_realcopypaste", f"copypaste_{k:05d}", slab, label, (0.7, 0.7))
    write_case(test, "test_p00099_s0", _real_like(rng)[0], np.zeros((96, 96), np.uint8), (0.7, 0.7))


def test_diagnose_measures_every_set_against_the_test_nodules_and_the_report_gives_a_verdict(tmp_path):
    rng = np.random.default_rng(2)
    _write_work(tmp_path, rng)
    datasets = {"real": "Dataset900_real", "real+synthetic": "Dataset901_realsynthetic",
                "real+copy-paste": "Dataset902_realcopypaste"}
    result = diagnose(tmp_path, datasets)
    assert result["test"]["count"] == 12 and result["real"]["count"] == 12  # the nodule-free test slice adds none
    assert result["real+synthetic"]["count"] == 12  # only the added lsdm_ cases, not the real ones beside them
    assert result["real+synthetic"]["mean_hu"][1] > 200 > result["real+copy-paste"]["mean_hu"][1]
    assert result["real+synthetic"]["appearance_auc"] > 0.9 > result["real+copy-paste"]["appearance_auc"]
    with pytest.raises(ValueError, match="arm 'real\\+on-the-fly' adds no cases"):
        diagnose(tmp_path, {"real+on-the-fly": "Dataset900_real"})
    report = {"recipe": {}, "arms": {}, "diagnosis": result,
              "comparisons": [{"arm": "real+synthetic", "baseline": "real+copy-paste", "mean": -0.04, "low": -0.1,
                               "high": 0.02, "resolved": False, "seed_differences": [-0.04]}]}
    text = "\n".join(_diagnosis_lines(report))
    assert "| LSDM cases | 12 |" in text and "| copy-paste (real, moved) | 12 |" in text
    assert "Verdict: LSDM cases did not beat copy-paste (the difference is not resolved): CPM difference -0.040" in text
    assert "a classifier tells LSDM nodules from real ones with AUC" in text


def test_an_added_case_counts_only_the_nodules_it_added_to_its_background(tmp_path):
    rng = np.random.default_rng(3)
    test, raw = tmp_path / "test", tmp_path / "raw"
    for k in range(6):
        write_case(test, f"test_p{k:05d}_s0", *_real_like(rng)[:2], (0.7, 0.7))
    backgrounds = []
    for k in range(6):  # real training slices, each with its own (dim) nodule
        hu, label, _ = _lung_slice(rng, -50, 5, centre=(30, 30))
        write_case(raw / "Dataset900_real", f"train_p{k:05d}_s0", hu, label, (0.7, 0.7))
        backgrounds.append((hu, label))
    for k, (hu, label) in enumerate(backgrounds):  # each LSDM case: a background plus one bright nodule
        hu, label = hu.copy(), label.copy()
        rows, cols = np.ogrid[:96, :96]
        disc = (rows - 65) ** 2 + (cols - 65) ** 2 <= 25
        hu[disc], label[disc] = 400.0, 1
        write_case(raw / "Dataset901_realsynthetic", f"lsdm_{k:05d}", hu, label, (0.7, 0.7))
    result = diagnose(tmp_path, {"real": "Dataset900_real", "real+synthetic": "Dataset901_realsynthetic"})
    assert result["real+synthetic"]["count"] == 6  # not 12: the backgrounds' own nodules are not the arm's
    assert result["real+synthetic"]["mean_hu"][0] > 300  # every counted nodule is an added bright one
    with pytest.raises(ValueError, match="needs the real training set"):
        diagnose(tmp_path, {"real+synthetic": "Dataset901_realsynthetic"})
