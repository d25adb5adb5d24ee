"""``lsdm-aug benchmark detection``: recipes, the reduced nnU-Net plan, copy-paste, and a smoke run of all arms."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from lsdm_aug.benchmarks.detection import (ARMS, DetectionRecipe, copy_paste_cases, load_detection_recipe,
                                           paired_difference, reduced_configuration, run_detection, trainer_settings)
from lsdm_aug.benchmarks.detection.data import real_slices
from lsdm_aug.benchmarks.detection.report import detection_markdown, save_curve_png, save_froc_png
from lsdm_aug.benchmarks.detection.scoring import _resamples
from lsdm_aug.metrics.detection import Candidate, CaseDetections
from lsdm_aug.bank import NoduleBank
from lsdm_aug.data.nnunet_format import write_case


def test_shipped_recipes_load_and_bad_ones_are_named(tmp_path):
    phantom = load_detection_recipe("bench-detection-phantom")
    assert set(phantom.arms) == set(ARMS) and len(phantom.seeds) >= 5 and phantom.prepared is None
    assert phantom.image_size == 512 and phantom.patch_size is not None  # native resolution, reduced plan
    scarce = load_detection_recipe("bench-detection-phantom-scarce")
    assert len({scarce.train_patients, *scarce.curve_train_patients}) >= 3 and "real" in scarce.curve_arms
    baseline = load_detection_recipe("bench-detection-phantom-baseline")
    assert baseline.arms == ("real",) and baseline.neighbour_slices == phantom.neighbour_slices == 1
    assert (baseline.num_epochs, baseline.patch_size) == (phantom.num_epochs, phantom.patch_size)
    lidc = load_detection_recipe("bench-detection-lidc-512")
    assert lidc.image_size == 512 and lidc.features_per_stage is None and lidc.device == "cuda"
    bad = tmp_path / "bad.yaml"
    bad.write_text("arms: [real, mixup]\n")
    with pytest.raises(ValueError, match="arms must be among"):
        load_detection_recipe(bad)
    bad.write_text("train_patients: 8\ntest_first_patient: 4\n")
    with pytest.raises(ValueError, match="test patients would be training patients"):
        load_detection_recipe(bad)
    bad.write_text("patch_size: [100, 128]\n")
    with pytest.raises(ValueError, match="patch_size must be two multiples of 16"):
        load_detection_recipe(bad)
    bad.write_text("epochs: 3\n")
    with pytest.raises(ValueError, match="unknown keys \\['epochs'\\]"):
        load_detection_recipe(bad)
    shipped = ("['bench-detection-lidc-512', 'bench-detection-phantom', 'bench-detection-phantom-baseline', "
               "'bench-detection-phantom-scarce']")
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


def test_a_smaller_patch_gets_the_stages_nnunets_planner_would_give_it():
    stages = 8  # nnU-Net's plan for 512 px slices
    configuration_2d = {"batch_size": 2, "patch_size": [512, 512], "architecture": {"arch_kwargs": {
        "n_stages": stages, "features_per_stage": [32, 64, 128, 256, 512, 512, 512, 512],
        "kernel_sizes": [[3, 3]] * stages, "strides": [[1, 1]] + [[2, 2]] * (stages - 1),
        "n_conv_per_stage": [2] * stages, "n_conv_per_stage_decoder": [2] * (stages - 1)}}}
    for patch, expected in ((128, 6), (96, 5), (160, 6), (64, 5)):
        reduced = reduced_configuration(configuration_2d, DetectionRecipe(patch_size=(patch, patch),
                                                                          features_per_stage=(8, 16)))
        kwargs = reduced["architecture"]["arch_kwargs"]
        assert reduced["patch_size"] == [patch, patch] and kwargs["n_stages"] == expected
        assert patch // 2 ** (expected - 1) >= 4 > patch // 2 ** expected  # downsampled down to a 4 px map
        assert len(kwargs["strides"]) == len(kwargs["kernel_sizes"]) == len(kwargs["n_conv_per_stage"]) == expected
        assert len(kwargs["n_conv_per_stage_decoder"]) == expected - 1
        assert kwargs["features_per_stage"] == [8] + [16] * (expected - 1)
    assert configuration_2d["architecture"]["arch_kwargs"]["n_stages"] == stages  # not modified


def test_the_test_set_does_not_depend_on_the_training_set_size():
    small, large = (DetectionRecipe(image_size=64, train_patients=n, test_patients=2, slices_per_patient=2)
                    for n in (2, 6))
    tests = [real_slices(recipe, "test") for recipe in (small, large)]
    assert [t[0] for t in tests[0]] == [t[0] for t in tests[1]]
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(*tests))
    train = {t[5] for t in real_slices(large, "train")}
    assert train.isdisjoint(t[5] for t in tests[0]) and len(train) == 6


def test_a_written_real_set_is_not_drawn_again(tmp_path, monkeypatch):
    from lsdm_aug.benchmarks.detection import data

    recipe = DetectionRecipe(image_size=64, train_patients=2, test_patients=1, slices_per_patient=2)
    first = data.write_real(recipe, tmp_path / "raw", tmp_path / "test")
    assert first == sorted(first) and len(first) == 4

    def refuse(*args, **kwargs):
        raise AssertionError("the phantom was drawn again")

    monkeypatch.setattr(data, "real_slices", refuse)
    assert data.write_real(recipe, tmp_path / "raw", tmp_path / "test") == first


def test_a_2_5d_recipe_writes_each_slice_with_its_neighbours_as_channels(tmp_path):
    from lsdm_aug.benchmarks.detection import data
    from lsdm_aug.data.nnunet_format import read_case

    recipe = DetectionRecipe(image_size=128, train_patients=1, test_patients=1, slices_per_patient=3,
                             nodule_free_fraction=0.0, arms=("real",), curve_arms=("real",), neighbour_slices=1,
                             slice_thickness_mm=2.5).validate()
    cases = data.write_real(recipe, tmp_path / "raw", tmp_path / "test")
    image, label, spacing = read_case(tmp_path / "raw" / data.dataset_name(recipe, "real"), cases[0])
    assert image.shape == (3, 128, 128) and label.shape == (128, 128) and label.any()
    assert not np.array_equal(image[0], image[1]) and not np.array_equal(image[1], image[2])
    rows, cols = np.nonzero(label)
    assert image[1][rows, cols].mean() > -700  # the label is the middle slice's nodule
    dataset = json.loads((tmp_path / "raw" / data.dataset_name(recipe, "real") / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT", "1": "CT", "2": "CT"}
    lesions = pd.read_csv(tmp_path / "test" / "lesions.csv")
    assert (lesions.lesion > 0).sum() >= 3  # every test slab has its nodules on the labelled slice


def test_2_5d_training_slabs_are_drawn_once_for_every_arm(tmp_path, monkeypatch):
    from lsdm_aug.benchmarks.detection import data
    from lsdm_aug.data.phantom_slab import draw_slab

    recipe = DetectionRecipe(image_size=64, train_patients=1, test_patients=1, slices_per_patient=2,
                             nodule_free_fraction=0.0, arms=("real", "real+copy-paste"), curve_arms=("real",),
                             neighbour_slices=1, slice_thickness_mm=2.0, data_seed=321).validate()
    drawn = []
    monkeypatch.setattr(data, "draw_slab", lambda *args: drawn.append(args[1]) or draw_slab(*args))
    first = data.real_slabs(recipe, "train")
    again = data.real_slabs(recipe, "train")
    assert drawn == [0, 1] and [c for c, _ in again] == [c for c, _ in first]
    assert all(a is b for (_, a), (_, b) in zip(first, again))
    data.real_slabs(recipe, "test")
    assert len(drawn) == 4  # test slabs are drawn when asked


def test_2_5d_copy_paste_moves_a_nodule_with_its_neighbouring_layers_into_free_lung():
    from lsdm_aug.benchmarks.detection.data import copy_paste_slabs, real_slabs

    recipe = DetectionRecipe(image_size=128, train_patients=2, test_patients=1, slices_per_patient=2,
                             nodule_free_fraction=0.0, arms=("real", "real+copy-paste"), curve_arms=("real",),
                             neighbour_slices=1, slice_thickness_mm=1.5).validate()
    slabs = dict(real_slabs(recipe, "train"))
    made = list(copy_paste_slabs(list(slabs.items()), 3, seed=0))
    assert len(made) == 3
    for _, image, label, spacing in made:
        assert image.shape == (3, 128, 128) and label.shape == (128, 128) and spacing[0] == spacing[1]
        background = min(slabs.values(), key=lambda slab: int((image != slab.hu).sum()))
        pasted = (image != background.hu).any(axis=0)
        assert 0 < pasted.sum() < 0.05 * pasted.size
        assert background.lung_mask.all(axis=0)[pasted].all()  # inside the lung on every slice
        assert not (background.nodule_mask > 0).any(axis=0)[pasted].any()  # over no other nodule
        assert label[pasted].any() and (label[~pasted] == (background.nodule_mask[1] > 0)[~pasted]).all()


def test_2_5d_lsdm_cases_insert_one_nodule_over_its_slices_centred_on_the_labelled_one(tmp_path, smoke_models):
    from lsdm_aug.benchmarks.detection import data

    recipe = DetectionRecipe(image_size=128, model=str(smoke_models), train_patients=2, test_patients=1,
                             slices_per_patient=2, arms=("real", "real+synthetic-unguided"), curve_arms=("real",),
                             neighbour_slices=1, slice_thickness_mm=1.5, synthetic_count=3, synthetic_steps=2).validate()
    slabs = dict(data.real_slabs(recipe, "train"))
    made = list(data.synthetic_slabs(recipe, list(slabs.items()), unguided=True))
    assert len(made) == 3 and [d["params"].features["malignancy"] for _, _, d in made] == [1, 2, 3]
    for _, slab, drawn in made:
        assert drawn["params"].centre_slice == 1 and 1 in drawn["params"].slices
        image, label, info = data.insert_into_slab(slab, drawn)
        changed = (image != slab.hu).any(axis=0)
        assert info["changed_pixels"] > 0 and changed.any()
        assert (label > (slab.nodule_mask[1] > 0)).sum() > 0  # the new nodule is labelled on the middle slice
        assert set(np.flatnonzero((image != slab.hu).any(axis=(1, 2)))) <= set(drawn["params"].slices)
    real_cases = data.write_real(recipe, tmp_path / "raw", tmp_path / "test")
    data.write_synthetic_arm(recipe, tmp_path / "raw", tmp_path, real_cases, "real+synthetic-unguided")
    target = tmp_path / "raw" / data.dataset_name(recipe, "real+synthetic-unguided")
    manifest = pd.read_csv(target / "manifest.csv")
    assert len(manifest) == 3 and (manifest.guidance_scale == 0).all() and (manifest.cfg_scale == 0).all()
    assert json.loads((target / "dataset.json").read_text())["numTraining"] == len(real_cases) + 3


def test_lsdm_cases_can_tell_the_unet_their_outlines_appearance(smoke_models):
    from lsdm_aug.benchmarks.detection import data

    base = dict(image_size=128, model=str(smoke_models), train_patients=2, test_patients=1, slices_per_patient=2,
                arms=("real", "real+synthetic"), curve_arms=("real",), neighbour_slices=1, slice_thickness_mm=1.5,
                synthetic_count=2, synthetic_steps=2)
    for flag in (False, True):
        recipe = DetectionRecipe(**base, appearance_from_outline=flag).validate()
        made = list(data.synthetic_slabs(recipe, list(dict(data.real_slabs(recipe, "train")).items())))
        assert all(d["synthesizer"].appearance_from_outline is flag for _, _, d in made)
        assert all(bool(d["params"].outline_appearance) is flag for _, _, d in made)


@pytest.mark.parametrize(("settings", "message"), [
    ({"neighbour_slices": 8}, "neighbour_slices must be in 0..7"),
    ({"neighbour_slices": 1, "slice_thickness_mm": 4.0}, "slice_thickness_mm must be in"),
    ({"neighbour_slices": 1, "prepared": "prepared/lidc"}, "prepared dataset"),
])
def test_bad_2_5d_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        DetectionRecipe(**({"curve_arms": ("real",)} | settings)).validate()


def _case(hit: bool, lesions: int = 1) -> CaseDetections:
    return CaseDetections([Candidate(0.9, 1 if hit else 0), Candidate(0.2, 0)], list(range(1, lesions + 1)))


def test_bootstrap_resamples_whole_patients():
    patients = ["a", "a", "a", "b", "c", "c"]
    for draw in _resamples(patients, 50, seed=1):
        counts = {name: sum(patients[p] == name for p in draw) for name in "abc"}
        assert counts["a"] % 3 == 0 and counts["c"] % 2 == 0  # a patient's slices come together
        assert sum(counts[n] // {"a": 3, "b": 1, "c": 2}[n] for n in "abc") == 3  # three patients drawn


def test_paired_difference_resolves_a_real_gain_and_not_a_tie():
    patients = [f"p{k // 2}" for k in range(20)]
    good = [[_case(True) for _ in range(20)] for _ in range(3)]
    poor = [[_case(k % 3 == 0) for k in range(20)] for _ in range(3)]
    gain = paired_difference({"runs": good}, {"runs": poor}, patients, resamples=300, seed=0)
    assert gain["mean"] > 0.3 and gain["resolved"] and gain["low"] > 0
    tie = paired_difference({"runs": poor}, {"runs": [list(r) for r in poor]}, patients, resamples=300, seed=0)
    assert tie["mean"] == 0 and not tie["resolved"] and tie["low"] <= 0 <= tie["high"]
    assert gain["seed_differences"] == pytest.approx([gain["mean"]] * 3)
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference({"runs": good}, {"runs": poor[:2]}, patients)
    cache: dict = {}
    first = paired_difference({"runs": good}, {"runs": poor}, patients, 300, 0, cache, ("good", "poor"))
    assert set(cache) == {"resamples", "seed_draws", "good", "poor"} and first["low"] == gain["low"]


def test_the_interval_carries_the_spread_between_seeds():
    """Two arms that swap which seeds train well: the seed means differ (2 good seeds of 3 against 1), every
    patient agrees, yet the runs say little: resampling the seeds leaves the difference unresolved, where
    resampling the patients alone would call it resolved."""
    import numpy as np

    from lsdm_aug.benchmarks.detection.scoring import _resamples, bootstrap_cpm

    patients = [f"p{k // 2}" for k in range(20)]
    good, poor = [_case(True) for _ in range(20)], [_case(k % 3 == 0) for k in range(20)]
    lucky, unlucky = {"runs": [good, poor, good]}, {"runs": [poor, good, poor]}
    result = paired_difference(lucky, unlucky, patients, resamples=300, seed=0)
    assert result["mean"] > 0.15 and result["resampled"] == "patients and seeds"
    assert not result["resolved"] and result["low"] < 0 < result["high"]
    draws = _resamples(patients, 300, seed=0)
    patients_only = bootstrap_cpm(lucky, draws) - bootstrap_cpm(unlucky, draws)
    assert np.percentile(patients_only, 2.5) > 0  # what the patient bootstrap alone would have said


def _fake_report(tmp_path) -> dict:
    run = {"cpm": 0.5, "sensitivity": 0.4, "false_positives_per_slice": 1.0, "dice": 0.3, "minutes": 2.0,
           "sensitivity_at": {str(float(r)): 0.5 for r in (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)},
           "sensitivity_by_malignancy": {"3": 0.5}, "sensitivity_by_malignancy_at_operating_point": {"3": 0.6},
           "sensitivity_by_size_at_operating_point": {"< 6 mm": 0.25, ">= 10 mm": 1.0},
           "froc": {"fps_per_slice": [0.0, 1.0, 4.0], "sensitivity": [0.0, 0.5, 0.7]}}
    from lsdm_aug.benchmarks.detection.scoring import summary
    from dataclasses import asdict

    arms = {arm: {"runs": [run, run], "summary": summary([run, run])} for arm in ("real", "real+synthetic")}
    return {"recipe": asdict(DetectionRecipe(seeds=(0, 1), patch_size=(128, 128))), "arms": arms,
            "test_patients": 10, "cpu_count": 2, "planned_batch_size": 2,
            "comparisons": [{"arm": "real+synthetic", "baseline": "real", "mean": 0.012, "low": -0.05,
                             "high": 0.07, "resolved": False, "seed_differences": [0.0, 0.024], "resamples": 300}],
            "curve": [{"train_patients": n, "arm": a, "cpm": {"mean": 0.1 * n, "std": 0.01}}
                      for n in (4, 8) for a in ("real", "real+synthetic")],
            "profile": {"iterations": 20, "batch_size": 4, "patch_size": [128, 128], "torch_threads": 1,
                        "iteration_s": 0.2, "network_s": 0.18, "batch_s": 0.02, "loading_s": 0.01,
                        "transforms_s": {"SpatialTransform": 0.006, "MirrorTransform": 0.004}}}


def test_the_report_has_its_tables_and_plots(tmp_path):
    report = _fake_report(tmp_path)
    markdown = detection_markdown(report)
    assert "| real+synthetic | real | +0.012 | [-0.050, +0.070] | no | +0.00, +0.02 |" in markdown
    assert "| real | 0.400 ± 0.010 | 0.800 ± 0.010 |" in markdown  # the curve, by training-set size
    assert "patch 128 x 128 px" in markdown and "network step 180 ms" in markdown
    assert "4.0 min for the 4 runs" not in markdown and "8 min for the 4 runs timed" in markdown
    assert "| arm | < 6 mm | >= 10 mm |" in markdown and "| real | 0.25 ± 0.00 | 1.00 ± 0.00 |" in markdown
    save_froc_png(report, tmp_path / "froc.png")
    save_curve_png(report, tmp_path / "curve.png")
    for name in ("froc.png", "curve.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_curve_gives_each_sizes_paired_difference_against_real_only(tmp_path):
    from lsdm_aug.benchmarks.detection.benchmark import _curve_comparisons
    from lsdm_aug.metrics.detection import Candidate, CaseDetections

    hit, miss = CaseDetections([Candidate(0.9, 1)], [1]), CaseDetections([Candidate(0.9, 0)], [1])
    by_size = {8: {"real": {"detections": [[miss, miss, hit], [miss, hit, miss]]},
                   "real+on-the-fly": {"detections": [[hit, hit, hit], [hit, hit, miss]]}},
               48: {"real+on-the-fly": {"detections": [[hit, hit, hit]] * 2}}}  # no real only: nothing to pair
    recipe = DetectionRecipe(seeds=(0, 1), bootstrap=200)
    compared = _curve_comparisons(recipe, by_size, ["p1", "p2", "p3"])
    assert [(c["train_patients"], c["arm"], c["baseline"]) for c in compared] == [(8, "real+on-the-fly", "real")]
    assert compared[0]["mean"] > 0 and compared[0]["low"] <= compared[0]["mean"] <= compared[0]["high"]
    report = _fake_report(tmp_path) | {"curve_comparisons": [{**compared[0], "mean": 0.25, "low": 0.1, "high": 0.4,
                                                              "resolved": True, "seed_differences": [0.3, 0.2]}]}
    assert "| 8 | real+on-the-fly | +0.250 | [+0.100, +0.400] | yes | +0.30, +0.20 |" in detection_markdown(report)


def test_curve_comparisons_at_the_main_size_reuse_the_main_comparisons_bootstrap_and_agree_with_it():
    from lsdm_aug.benchmarks.detection.benchmark import _comparisons, _curve_comparisons
    from lsdm_aug.metrics.detection import Candidate, CaseDetections

    hit, miss = CaseDetections([Candidate(0.9, 1)], [1]), CaseDetections([Candidate(0.9, 0)], [1])
    main = {"real": {"detections": [[miss, miss, hit], [miss, hit, miss]]},
            "real+on-the-fly": {"detections": [[hit, hit, hit], [hit, hit, miss]]}}
    small = {"real": {"detections": [[miss, miss, miss], [miss, hit, miss]]},
             "real+on-the-fly": {"detections": [[hit, miss, hit], [hit, hit, hit]]}}
    recipe = DetectionRecipe(seeds=(0, 1), bootstrap=200, train_patients=24)
    patients = ["p1", "p2", "p3"]
    cache: dict = {}
    main_comparisons = _comparisons(recipe, main, patients, cache)
    assert set(cache) == {"resamples", "seed_draws", "real", "real+on-the-fly"}
    shared = _curve_comparisons(recipe, {8: small, 24: main}, patients, cache)
    assert set(cache) - {"resamples", "seed_draws", "real", "real+on-the-fly"} == {(8, "real"), (8, "real+on-the-fly")}
    alone = _curve_comparisons(recipe, {8: small, 24: main}, patients)  # a fresh cache: the same figures
    assert shared == alone
    at_main = next(c for c in shared if c["train_patients"] == 24)
    assert {k: v for k, v in at_main.items() if k != "train_patients"} == main_comparisons[0]


def test_the_report_says_whether_the_real_only_baseline_learns_and_which_model_made_the_lsdm_arms(tmp_path):
    report = _fake_report(tmp_path) | {"lsdm_model": "phantom-512@1500/4000#71ddc4cc"}
    markdown = detection_markdown(report)  # real only at CPM 0.5 with sensitivity 0.4: met
    assert "Baseline check: real only reaches CPM 0.500 and sensitivity 0.400" in markdown and ": met." in markdown
    assert "(model `default` = phantom-512@1500/4000#71ddc4cc," in markdown
    report["arms"]["real"]["summary"]["cpm"]["mean"] = 0.39
    assert "CPM 0.390" in detection_markdown(report) and "not met, so the arms" in detection_markdown(report)


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
                             on_the_fly={"prob": 1.0, "malignancy": "balanced", "bank": "build", "bank_count": 3},
                             seeds=(0,), features_per_stage=(4, 8, 8, 8), batch_size=2, num_epochs=1,
                             iterations_per_epoch=2, val_iterations_per_epoch=1, dataset_id=960, workers=2,
                             bootstrap=50, curve_train_patients=(1,), curve_arms=("real",))
    work = tmp_path / "work"
    report = run_detection(recipe, work, tmp_path / "report")
    assert list(report["arms"]) == list(ARMS)
    lesions = pd.read_csv(work / "test" / "lesions.csv")
    assert set(lesions.patient_id) == {"p01000", "p01001"}  # held-out patients, apart from training ones
    for arm in ARMS:
        run = report["arms"][arm]["runs"][0]
        assert 0 <= run["cpm"] <= 1 and run["slices"] == 6 and run["lesions"] >= 1
        assert list(run["sensitivity_at"]) == ["0.125", "0.25", "0.5", "1.0", "2.0", "4.0", "8.0"]
        levels = {str(int(np.floor(m + 0.5))) for m in lesions.query("lesion > 0").malignancy}
        at_operating_point = run["sensitivity_by_malignancy_at_operating_point"]
        assert set(at_operating_point) == levels and all(0 <= v <= 1 for v in at_operating_point.values())
        by_size = run["sensitivity_by_size_at_operating_point"]
        assert by_size and set(by_size) <= {"< 6 mm", "6-10 mm", ">= 10 mm"}
        assert run["operating_score"] is None or 0 <= run["operating_score"] <= 1
        assert run["minutes"] > 0  # the wall time the run's done.json recorded
        assert len(run["froc"]["fps_per_slice"]) == len(run["froc"]["sensitivity"]) >= 1
    assert len(NoduleBank(work / "bank")) == 3  # built once for the on-the-fly arm
    chance = report["chance"]["runs"][0]
    assert 0 <= chance["cpm"] <= 1 and chance["sensitivity"] == 0  # noise never reaches the threshold
    for dataset in ("Dataset960_real", "Dataset961_realsynthetic", "Dataset962_realcopypaste",
                    "Dataset963_realsyntheticunguided"):  # one budget
        plans = json.loads((work / "preprocessed" / dataset / "nnUNetPlans.json").read_text())
        assert plans["configurations"]["2d_cpu"]["batch_size"] == 2
        assert plans["configurations"]["2d_cpu"]["inherits_from"] == "2d"
    for folder, guidance, cfg in (("synthetic", 1.0, None), ("synthetic-unguided", 0.0, 0.0)):
        manifest = pd.read_csv(work / folder / "manifest.csv")
        assert (manifest.guidance_scale == guidance).all() and len(manifest) == 3
        assert manifest.cfg_scale.isna().all() if cfg is None else (manifest.cfg_scale == cfg).all()
        assert manifest.background.str.startswith("train_p0000").all()  # on the real training slices
    synthetic = json.loads((work / "raw" / "Dataset961_realsynthetic" / "dataset.json").read_text())
    assert synthetic["numTraining"] == 6 + 3
    predictions = work / "predictions"
    inserted = [np.load(f)["probabilities"] for f in sorted((predictions / "real_on-the-fly" / "seed0").glob("*.npz"))]
    real = [np.load(f)["probabilities"] for f in sorted((predictions / "real" / "seed0").glob("*.npz"))]
    # one seed, one data stream: only inserted nodules can make the on-the-fly arm's network differ
    assert len(real) == 6 and any(np.abs(a - b).max() > 0 for a, b in zip(real, inserted))
    assert json.loads((work / "preprocessed" / "Dataset960_real" / "preprocessed.json").read_text()) == {
        "ct_window": [-1024.0, 800.0]}
    pairs = {(c["arm"], c["baseline"]) for c in report["comparisons"]}
    assert ("real+synthetic", "real") in pairs and ("real+synthetic", "real+copy-paste") in pairs
    assert ("real+synthetic", "real+synthetic-unguided") in pairs  # the value of control, paired
    assert ("real", "real+copy-paste") not in pairs and all(c["resamples"] == 50 for c in report["comparisons"])
    assert {(p["train_patients"], p["arm"]) for p in report["curve"]} == {(1, "real"), (2, "real")}
    assert report["profile"]["network_s"] > 0 and "NoduleSynthTransform" in report["profile"]["transforms_s"]
    done = sorted(work.rglob("done.json"))
    assert len(done) == len(ARMS) + 1  # the curve's 1-patient run in its own folder
    stamps = [p.stat().st_mtime_ns for p in done]
    again = run_detection(recipe, work, tmp_path / "report")  # finished arms are not retrained
    assert [p.stat().st_mtime_ns for p in done] == stamps and again["arms"] == report["arms"]
    # other prediction settings: the trained network predicts again, it is not trained again
    checkpoint = next((work / "results" / "real" / "seed0").rglob("checkpoint_final.pth"))
    trained_at, first = checkpoint.stat().st_mtime_ns, json.loads((predictions / "real" / "seed0" / "done.json").read_text())
    run_detection(replace(recipe, arms=("real",), test_time_mirroring=False, curve_train_patients=()), work,
                  tmp_path / "report-unmirrored")
    redone = json.loads((predictions / "real" / "seed0" / "done.json").read_text())
    assert checkpoint.stat().st_mtime_ns == trained_at and redone["train"] is False and redone["mirroring"] is False
    assert redone["train_minutes"] == first["train_minutes"] and redone["predict_minutes"] > 0
    markdown = (tmp_path / "report" / "detection.md").read_text()
    assert "| real+copy-paste |" in markdown and "16 highest local maxima" in markdown
    assert "| chance (random candidates) |" in markdown and "Paired CPM differences" in markdown
    assert "min per (arm, seed) run" in markdown and f"for the {len(ARMS)} runs timed" in markdown
    assert (tmp_path / "report" / "froc.png").is_file() and (tmp_path / "report" / "scarce_curve.png").is_file()
    diagnosis = report["diagnosis"]  # each arm's added nodules against the test ones
    assert set(diagnosis) == {"test", "real", "real+synthetic", "real+synthetic-unguided", "real+copy-paste"}
    assert diagnosis["real+synthetic"]["count"] >= 3 and diagnosis["test"]["count"] == int((lesions.lesion > 0).sum())
    assert "| LSDM cases | " in markdown and "Verdict: LSDM cases" in markdown


@pytest.mark.slow
def test_a_2_5d_benchmark_trains_on_slabs_and_inserts_on_the_fly_over_the_channels(tmp_path, smoke_models):
    recipe = DetectionRecipe(name="smoke-2.5d", image_size=64, model=str(smoke_models), train_patients=2,
                             test_patients=1, slices_per_patient=3, nodule_free_fraction=0.0,
                             on_the_fly={"prob": 1.0, "malignancy": "balanced", "bank": "build", "bank_count": 3},
                             arms=("real", "real+on-the-fly"), curve_arms=("real",), seeds=(0,),
                             features_per_stage=(4, 8, 8, 8), batch_size=2, num_epochs=1, iterations_per_epoch=2,
                             val_iterations_per_epoch=1, dataset_id=970, workers=1, bootstrap=20,
                             neighbour_slices=1, slice_thickness_mm=2.5, synthetic_steps=2)
    work = tmp_path / "work"
    report = run_detection(recipe, work, tmp_path / "report")
    plans = json.loads((work / "preprocessed" / "Dataset970_real" / "nnUNetPlans.json").read_text())
    assert len(plans["foreground_intensity_properties_per_channel"]) == 3  # three CT channels
    predictions = work / "predictions"
    real = [np.load(f)["probabilities"] for f in sorted((predictions / "real" / "seed0").glob("*.npz"))]
    inserted = [np.load(f)["probabilities"] for f in sorted((predictions / "real_on-the-fly" / "seed0").glob("*.npz"))]
    assert len(real) == 3 and any(np.abs(a - b).max() > 0 for a, b in zip(real, inserted))
    assert all(0 <= report["arms"][arm]["runs"][0]["cpm"] <= 1 for arm in recipe.arms)


def test_the_on_the_fly_arm_gets_the_work_folder_bank_and_no_bank_count(tmp_path):
    recipe = DetectionRecipe(on_the_fly={"prob": 0.3, "malignancy": "balanced", "bank": "build", "bank_count": 50})
    settings = trainer_settings(recipe, "real+on-the-fly", 2, tmp_path)
    assert settings["bank"] == str(tmp_path / "bank") and "bank_count" not in settings
    assert settings["seed"] == 2 and settings["prob"] == 0.3
    assert trainer_settings(recipe, "real", 2, tmp_path)["prob"] == 0.0  # the other arms insert nothing
    assert settings["appearance_from_outline"] is True  # the recipe's, live or banked
    plain = DetectionRecipe(on_the_fly={"prob": 0.3}, appearance_from_outline=False).validate()
    assert trainer_settings(plain, "real+on-the-fly", 0, tmp_path)["appearance_from_outline"] is False


def test_the_recipe_hands_the_augmentation_and_plot_settings_to_the_trainer(tmp_path):
    settings = trainer_settings(DetectionRecipe(), "real", 0, tmp_path)
    assert settings["progress_plot_every"] == 10 and "scaling" not in settings and "p_scaling" not in settings
    recipe = DetectionRecipe(p_scaling=0.5, scaling=(0.6, 1.6), progress_plot_every=1).validate()
    settings = trainer_settings(recipe, "real+copy-paste", 0, tmp_path)
    assert (settings["p_scaling"], settings["scaling"], settings["progress_plot_every"]) == (0.5, [0.6, 1.6], 1)
    assert "random_crop" not in settings  # nnU-Net's centred foreground patches unless the recipe says otherwise
    assert DetectionRecipe(patch_size=(96, 96), tile_size=192).validate().tile_size == 192
    assert trainer_settings(DetectionRecipe(random_crop=True).validate(), "real", 0, tmp_path)["random_crop"] is True
    for bad, message in (({"scaling": (1.4, 0.7)}, "scaling must be \\[low, high\\]"),
                         ({"p_scaling": -0.1}, "p_scaling must be in \\[0, 1\\]"),
                         ({"progress_plot_every": 0}, "progress_plot_every must be >= 1"),
                         ({"random_crop": "yes"}, "random_crop must be true or false \\(nnU-Net's: false\\), got 'yes'"),
                         ({"patch_size": (96, 96), "tile_size": 64},
                          "tile_size must be null \\(the patch\\) or an int >= the patch size \\[96, 96\\], got 64")):
        with pytest.raises(ValueError, match=message):
            DetectionRecipe(**bad).validate()


def test_the_report_names_the_optimizer_sampling_and_scaling_it_trained_with(tmp_path):
    report = _fake_report(tmp_path)
    report["recipe"] |= {"optimizer": "sgd", "initial_lr": None, "oversample_foreground": None, "p_scaling": None,
                         "scaling": None}
    assert ("nnU-Net's SGD from learning rate 0.01, 33% of patches centred on a nodule, scaling augmentation "
            "0.7-1.4x on 20% of patches") in detection_markdown(report)
    report["recipe"] |= {"optimizer": "adamw", "initial_lr": 0.003, "oversample_foreground": 0.5, "p_scaling": 0.5,
                         "scaling": [0.6, 1.6]}
    assert ("nnU-Net's AdamW from learning rate 0.003, 50% of patches centred on a nodule, scaling augmentation "
            "0.6-1.6x on 50% of patches") in detection_markdown(report)
    assert "(tiles of the training patch, step" in detection_markdown(report)
    report["recipe"] |= {"tile_size": 192}
    assert "(192 px tiles, step" in detection_markdown(report)
    report["recipe"] |= {"random_crop": True}
    assert ("50% of patches holding a nodule anywhere within a third of the patch from its centre"
            in detection_markdown(report))


def test_the_report_says_when_the_detector_is_2_5d(tmp_path):
    report = _fake_report(tmp_path)
    assert "2.5D" not in detection_markdown(report)
    report["recipe"] |= {"neighbour_slices": 1, "slice_thickness_mm": 2.5}
    assert "1 slice(s) on each side, 2.5 mm apart, are 2 more nnU-Net input channels" in detection_markdown(report)


def test_lesions_are_grouped_by_the_diameter_of_their_labelled_area():
    from lsdm_aug.benchmarks.detection.scoring import size_group

    disk = np.hypot(*np.mgrid[-20:21, -20:21]) <= 10  # 21 px across
    assert size_group(disk, (0.25, 0.25)) == "< 6 mm"  # about 5.3 mm
    assert size_group(disk, (0.4, 0.4)) == "6-10 mm"  # about 8.4 mm
    assert size_group(disk, (0.5, 0.5, 2.5)) == ">= 10 mm"  # about 10.5 mm; the slice thickness plays no part


def _predicted(work, arm: str, seed: int, quality: float) -> None:
    """Fake nnU-Net probabilities for ``arm``/``seed``: each lesion at ``quality`` where ``quality`` > 0.5 finds
    it, plus a false positive in a corner; done.json written as a finished run's."""
    from lsdm_aug.benchmarks.detection.runs import predictions_folder
    from lsdm_aug.data.nnunet_format import read_case

    folder = predictions_folder(work, arm, seed)
    folder.mkdir(parents=True)
    for case_id in pd.read_csv(work / "test" / "lesions.csv").case_id.unique():
        _, instances, _ = read_case(work / "test", case_id)
        foreground = np.where(instances > 0, quality, 0.0)
        foreground[:3, :3] = 0.9
        np.savez(folder / f"{case_id}.npz", probabilities=np.stack([1 - foreground, foreground])[:, None])
    (folder / "done.json").write_text("{}")


def test_detection_compare_pairs_one_arm_of_two_work_folders(tmp_path):
    import shutil

    from typer.testing import CliRunner

    from lsdm_aug.benchmarks.detection import compare_work_folders, data
    from lsdm_aug.cli import app

    recipe = DetectionRecipe(image_size=64, train_patients=1, test_patients=3, slices_per_patient=2,
                             nodule_free_fraction=0.0, arms=("real",), curve_arms=("real",), bootstrap=200).validate()
    better, worse = tmp_path / "on", tmp_path / "off"
    data.write_real(recipe, better / "raw", better / "test")
    shutil.copytree(better / "test", worse / "test")
    for seed in (0, 1):
        _predicted(better, "real+on-the-fly", seed, 0.95)  # finds every lesion, above the corner's 0.9
        _predicted(worse, "real+on-the-fly", seed, 0.6)  # finds them ranked below the false positive
    _predicted(better, "real+on-the-fly", 2, 0.95)  # a seed finished in one folder only is left out
    result = compare_work_folders(better, worse, "real+on-the-fly", recipe)
    assert result["seeds"] == [0, 1] and result["mean"] > 0 and result["low"] > 0 and result["resolved"]
    assert compare_work_folders(worse, better, "real+on-the-fly", recipe)["mean"] == pytest.approx(-result["mean"])
    with pytest.raises(ValueError, match="needs bootstrap resamples; the recipe has bootstrap = 0"):
        compare_work_folders(better, worse, "real+on-the-fly", replace(recipe, bootstrap=0))
    with pytest.raises(ValueError, match=r"arm must be one of \["):
        compare_work_folders(better, worse, "real+magic", recipe)
    with pytest.raises(ValueError, match="no seed of 'real' is finished in both"):
        compare_work_folders(better, worse, "real", recipe)
    lesions = pd.read_csv(worse / "test" / "lesions.csv")
    lesions.drop(index=lesions.index[-1]).to_csv(worse / "test" / "lesions.csv", index=False)
    result = CliRunner().invoke(app, ["benchmark", "detection-compare", "--work", str(better), "--against", str(worse),
                                       "--arm", "real+on-the-fly"])
    assert result.exit_code == 2 and "hold different test sets" in result.output
