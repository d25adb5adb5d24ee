"""``lsdm-aug benchmark detection``: recipes, the reduced nnU-Net plan, copy-paste, and a smoke run of all arms."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from lsdm_aug.benchmarks.detection import (ARMS, DetectionRecipe, _trainer_settings, copy_paste_cases,
                                           load_detection_recipe, reduced_configuration, run_detection)
from lsdm_aug.bank import NoduleBank
from lsdm_aug.data.nnunet_format import write_case


def test_shipped_recipes_load_and_bad_ones_are_named(tmp_path):
    phantom = load_detection_recipe("bench-detection-phantom")
    assert phantom.arms == ARMS[:3] and len(phantom.seeds) >= 3 and phantom.prepared is None
    assert load_detection_recipe("bench-detection-phantom-copy-paste").arms == ("real+copy-paste",)
    lidc = load_detection_recipe("bench-detection-lidc-512")
    assert lidc.image_size == 512 and lidc.features_per_stage is None and lidc.device == "cuda"
    bad = tmp_path / "bad.yaml"
    bad.write_text("arms: [real, mixup]\n")
    with pytest.raises(ValueError, match="arms must be among"):
        load_detection_recipe(bad)
    bad.write_text("epochs: 3\n")
    with pytest.raises(ValueError, match="unknown keys \\['epochs'\\]"):
        load_detection_recipe(bad)
    shipped = "['bench-detection-lidc-512', 'bench-detection-phantom', 'bench-detection-phantom-copy-paste']"
    with pytest.raises(FileNotFoundError, match=re.escape(f"shipped: {shipped}")):
        load_detection_recipe("bench-detection-nothing")


def test_reduced_configuration_inherits_2d_and_only_narrows_it():
    configuration_2d = {"batch_size": 12, "patch_size": [128, 128], "architecture": {
        "network_class_name": "PlainConvUNet", "arch_kwargs": {"n_stages": 6, "features_per_stage": [32, 64, 128, 256,
                                                                                                   512, 512]}}}
    reduced = reduced_configuration(configuration_2d, DetectionRecipe(features_per_stage=(8, 16, 32), batch_size=4))
    assert reduced["inherits_from"] == "2d" and reduced["batch_size"] == 4 and "patch_size" not in reduced
    assert reduced["architecture"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32, 32, 32, 32]
    assert configuration_2d["architecture"]["arch_kwargs"]["features_per_stage"][0] == 32  # not modified
    untouched = reduced_configuration(configuration_2d, DetectionRecipe(features_per_stage=None, batch_size=None))
    assert untouched == {"inherits_from": "2d"}


def test_copy_paste_moves_real_nodule_pixels_into_lung(tmp_path):
    from lsdm_aug.data.phantom import ChestPhantom, PhantomConfig

    phantom = ChestPhantom(PhantomConfig(size=64, slices_per_patient=2, nodule_free_fraction=0.0))
    cases = []
    for index in range(4):
        ct = phantom.slice(index, seed=3)
        write_case(tmp_path, f"c{index}", ct.hu, (ct.nodule_mask > 0).astype(np.uint8), (ct.spacing_mm, ct.spacing_mm))
        cases.append((f"c{index}", ct))
    made = list(copy_paste_cases(tmp_path, [c for c, _ in cases], count=3, seed=0))
    assert [m[0] for m in made] == ["copypaste_00000", "copypaste_00001", "copypaste_00002"]
    for _, image, label, _ in made:
        assert label.sum() > 0
        assert set(np.unique(label)) <= {0, 1}


@pytest.mark.slow
def test_every_arm_trains_predicts_and_is_scored_then_a_rerun_skips_them(tmp_path, smoke_models):
    recipe = DetectionRecipe(name="smoke", image_size=64, model=str(smoke_models), train_patients=2, test_patients=2,
                             slices_per_patient=3, nodule_free_fraction=0.3, synthetic_count=3, synthetic_steps=2,
                             on_the_fly={"prob": 0.5, "malignancy": "balanced", "bank": "build", "bank_count": 3},
                             seeds=(0,),
                             features_per_stage=(4, 8, 8, 8), batch_size=2, num_epochs=1, iterations_per_epoch=2,
                             val_iterations_per_epoch=1, dataset_id=960)
    report = run_detection(recipe, tmp_path / "work", tmp_path / "report")
    assert list(report["arms"]) == list(ARMS)
    for arm in ARMS:
        run = report["arms"][arm]["runs"][0]
        assert 0 <= run["cpm"] <= 1 and run["slices"] == 6 and run["lesions"] >= 1
        assert list(run["sensitivity_at"]) == ["0.125", "0.25", "0.5", "1.0", "2.0", "4.0", "8.0"]
        lesions = pd.read_csv(tmp_path / "work" / "test" / "lesions.csv").query("lesion > 0")
        levels = {str(int(np.floor(m + 0.5))) for m in lesions.malignancy}
        at_operating_point = run["sensitivity_by_malignancy_at_operating_point"]
        assert set(at_operating_point) == levels and all(0 <= v <= 1 for v in at_operating_point.values())
        assert run["operating_score"] is None or 0 <= run["operating_score"] <= 1
        assert run["minutes"] > 0  # the wall time the run's done.json recorded
    assert len(NoduleBank(tmp_path / "work" / "bank")) == 3  # built once for the on-the-fly arm
    chance = report["chance"]["runs"][0]
    assert 0 <= chance["cpm"] <= 1 and chance["sensitivity"] == 0  # noise never reaches the threshold
    for dataset in ("Dataset960_real", "Dataset961_realsynthetic", "Dataset962_realcopypaste"):  # one budget
        configuration = json.loads((tmp_path / "work" / "preprocessed" / dataset / "nnUNetPlans.json").read_text())
        assert configuration["configurations"]["2d_cpu"]["batch_size"] == 2
    plans = json.loads((tmp_path / "work" / "preprocessed" / "Dataset960_real" / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["2d_cpu"]["inherits_from"] == "2d"
    synthetic = json.loads((tmp_path / "work" / "raw" / "Dataset961_realsynthetic" / "dataset.json").read_text())
    assert synthetic["numTraining"] == 6 + 3
    predictions = tmp_path / "work" / "predictions"
    inserted = [np.load(f)["probabilities"] for f in sorted((predictions / "real_on-the-fly" / "seed0").glob("*.npz"))]
    real = [np.load(f)["probabilities"] for f in sorted((predictions / "real" / "seed0").glob("*.npz"))]
    # one seed, one data stream: only inserted nodules can make the on-the-fly arm's network differ
    assert len(real) == 6 and any(np.abs(a - b).max() > 0 for a, b in zip(real, inserted))
    assert json.loads((tmp_path / "work" / "preprocessed" / "Dataset960_real" / "preprocessed.json").read_text()) == {
        "ct_window": [-1024.0, 800.0]}
    done = sorted((tmp_path / "work" / "predictions").rglob("done.json"))
    assert len(done) == 4
    stamps = [p.stat().st_mtime_ns for p in done]
    again = run_detection(recipe, tmp_path / "work", tmp_path / "report")  # finished arms are not retrained
    assert [p.stat().st_mtime_ns for p in done] == stamps and again["arms"] == report["arms"]
    markdown = (tmp_path / "report" / "detection.md").read_text()
    assert "| real+copy-paste |" in markdown and "16 highest local maxima" in markdown
    assert "| chance (random candidates) |" in markdown
    assert "min per (arm, seed) run" in markdown and "for the 4 runs timed" in markdown


def test_the_on_the_fly_arm_gets_the_work_folder_bank_and_no_bank_count(tmp_path):
    recipe = DetectionRecipe(on_the_fly={"prob": 0.3, "malignancy": "balanced", "bank": "build", "bank_count": 50})
    settings = _trainer_settings(recipe, "real+on-the-fly", 2, tmp_path)
    assert settings["bank"] == str(tmp_path / "bank") and "bank_count" not in settings
    assert settings["seed"] == 2 and settings["prob"] == 0.3
    assert _trainer_settings(recipe, "real", 2, tmp_path)["prob"] == 0.0  # the other arms insert nothing
