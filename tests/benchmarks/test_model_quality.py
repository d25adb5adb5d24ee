"""lsdm-aug benchmark model-quality measures every gate and writes its report (tiny smoke run)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy import ndimage

from lsdm_aug.benchmarks.model_card import write_model_card
from lsdm_aug.benchmarks.model_quality import GuidanceSetting, QualitySettings, gates, run_model_quality


def test_model_quality_writes_every_gate(tmp_path, smoke_models, phantom_dataset):
    settings = QualitySettings(data=str(phantom_dataset), model=str(smoke_models), out=str(tmp_path / "q"), count=2,
                               steps=2, evaluator_steps=2, generated_slices=2, features=("malignancy",),
                               settings=(GuidanceSetting("none", 0.0, 0.0), GuidanceSetting("classifier s=1", 1.0, 0.0),
                                         GuidanceSetting("cfg w=2", 0.0, 2.0), GuidanceSetting("both", 1.0, 1.0)),
                               other_spacings=((2.8, 128),))
    report = run_model_quality(settings, progress=False)
    saved = json.loads((tmp_path / "q" / "model_quality.json").read_text())
    assert saved["model"] == report["model"]
    names = [name for name, _, _ in gates(report)]
    assert any("SSIM" in n for n in names) and any("at 2.8 mm" in n for n in names)
    # control gates at the model's default (s = 1, w = its default cfg_scale, 1 for the smoke U-Net)
    malignancy = next(g for g in gates(report) if g[0].startswith("malignancy AUC"))
    expected = report["control"]["per_feature"]["malignancy"]["both"]
    low, high = report["control"]["per_feature_interval"]["malignancy"]["both"]  # its 95 % bootstrap interval
    assert 0 <= low <= expected <= high <= 1
    assert malignancy[0] == "malignancy AUC >= 0.85 at the default (both)"
    assert malignancy[1].startswith(f"{expected:.3f} [{low:.3f}, {high:.3f}]")
    alone = next(p for p in report["control"]["guidance_alone"] if p["setting"] == "both")
    assert alone["auc_interval"][0] <= alone["auc"] <= alone["auc_interval"][1]
    assert next(g for g in gates(report) if g[0].startswith("guidance alone"))[1].startswith(
        f"{alone['auc']:.3f} [{alone['auc_interval'][0]:.3f}, {alone['auc_interval'][1]:.3f}]")
    assert set(report["control"]["per_feature"]["malignancy"]) == {"none", "classifier s=1", "cfg w=2", "both"}
    without_default = {**report, "settings": {**report["settings"], "settings": [
        s for s in report["settings"]["settings"] if s["name"] != "both"]}}
    aucs = report["control"]["per_feature"]["malignancy"]
    best = max(aucs, key=aucs.get)
    interval = report["control"]["per_feature_interval"]["malignancy"][best]
    assert ("malignancy AUC >= 0.85 (best setting)", f"{aucs[best]:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]",
            aucs[best] >= 0.85) in gates(without_default)
    assert report["control"]["guidance_alone"][0]["frechet_vs_none"] == 1.0
    texture = report["texture"]  # saturation after the pipeline's redraws, and of the first draws
    assert texture["max_redraws"] == 2 and 0 <= texture["saturated_share"] <= texture["first_draw_saturated_share"] <= 1
    saturation = next(g for g in gates(report) if g[0].startswith("<= 2 % saturated"))
    assert saturation[1] == (f"{texture['saturated_share']:.3f} (first draws "
                             f"{texture['first_draw_saturated_share']:.3f}, up to 2 redraws)")
    sensitivity = report["feature_sensitivity"]  # the smoke U-Net is feature-conditioned
    assert set(sensitivity["relative_change"]) == {"100", "500", "900"}
    assert all(v >= 0 for t in sensitivity["relative_change"].values() for v in t.values())
    markdown = (tmp_path / "q" / "model_quality.md").read_text()
    assert "| gate | measured | met |" in markdown and "lsdm-aug benchmark model-quality" in markdown
    assert report["edge_profile"]["rings"] == ["0-1 mm", "1-2 mm", "2-3 mm", "over 3 mm"]  # where it loses its HU
    edge_text = json.dumps(saved["edge_profile"])
    assert "Infinity" not in edge_text and "NaN" not in edge_text  # strict JSON
    measured = bool(report["edge_profile"]["nodules"])  # the fixture's nodules are smaller than the section's least
    assert ("## Nodule edge (in place, default guidance)" in markdown) == measured
    assert "in brackets the 95 % bootstrap interval over them" in markdown
    speed = report["speed"]  # where insertion's time goes, beside the ratio
    assert speed["unet_step_whole_seconds"] > speed["unet_step_window_seconds"] > 0 < speed["encode_window_seconds"]
    assert "where the ratio stops short of the" in markdown and "encodes the window's own image" in markdown
    grid = tmp_path / "q" / "guidance_grid.png"
    assert grid.is_file() and grid.stat().st_size > 1000 and "guidance_grid.png" in markdown
    model = tmp_path / "model"
    shutil.copytree(smoke_models, model)
    card = write_model_card(model, "lsdm-aug prepare phantom ...", ["lsdm-aug train ..."],
                            tmp_path / "q" / "model_quality.json")
    assert "| feature | none | classifier s=1 | cfg w=2 | both |" in card and "![guidance grid](guidance_grid.png)" in card
    assert "feature vector (CFG: malignancy, lobulation, spiculation, texture, calcification)" in card
    assert ("## Nodule edge (in place, default guidance)" in card) == measured
    texture_row = next(line for line in card.splitlines() if line.startswith("| classifier: texture"))
    assert "guidance targets (its mean on real nodules per level, t = 0): " in texture_row
    assert (model / "guidance_grid.png").read_bytes() == grid.read_bytes()  # the card's picture beside it


def test_a_rerun_resumes_from_finished_sections(tmp_path, smoke_models, phantom_dataset, monkeypatch):
    from lsdm_aug.benchmarks import model_quality

    settings = QualitySettings(data=str(phantom_dataset), model=str(smoke_models), out=str(tmp_path / "q"), count=2,
                               steps=2, evaluator_steps=2, generated_slices=2, features=("malignancy",),
                               settings=(GuidanceSetting("none", 0.0, 0.0), GuidanceSetting("cfg w=2", 0.0, 2.0)),
                               other_spacings=())
    first = run_model_quality(settings, progress=False)
    parts = next((tmp_path / "q").glob("parts-*"))
    explicit = next((tmp_path / "q").glob("explicit-*"))
    assert (explicit / "control_1.json").is_file()
    assert next((tmp_path / "q").glob("evaluators-*/evaluator_malignancy.safetensors")).is_file()
    assert next((tmp_path / "q").glob("autoencoder-*/autoencoder.json")).is_file()
    (explicit / "control_1.json").unlink()  # as if interrupted during the second setting
    (explicit / "control_0.json").rename(parts / "control_0.json")  # as an earlier version kept it: still read

    def refuse(*args, **kwargs):
        raise AssertionError("a finished section was computed again")

    calls = []
    monkeypatch.setattr(model_quality, "texture_fidelity", refuse)
    monkeypatch.setattr(model_quality.NoduleEvaluator, "train", refuse)
    monkeypatch.setattr(model_quality, "guidance_grid", refuse)
    monkeypatch.setattr(model_quality, "feature_sensitivity", refuse)
    original = model_quality.control_setting
    monkeypatch.setattr(model_quality, "control_setting", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = run_model_quality(settings, progress=False)
    assert calls == [1]  # only the missing setting
    assert again["texture"] == first["texture"] and again["control"]["per_feature"] == first["control"]["per_feature"]
    for point, before in zip(again["control"]["guidance_alone"], first["control"]["guidance_alone"]):
        assert point["auc"] == before["auc"] and point["nodule_frechet"] == pytest.approx(before["nodule_frechet"])
    other = QualitySettings(**{**settings.__dict__, "seed": 1})
    assert model_quality.Parts(tmp_path / "q", other, again["model"]).folder != parts  # other settings, other parts
    here = model_quality.Parts(tmp_path / "q", settings, again["model"], "ae1")
    another_unet = model_quality.Parts(tmp_path / "q", settings, again["model"] + "-retrained", "ae1")
    assert another_unet.folder != here.folder  # the U-Net's sections are its own
    assert another_unet.evaluator_folder == here.evaluator_folder  # evaluators never see the model
    assert another_unet.autoencoder_folder == here.autoencoder_folder  # same autoencoder, same reconstruction gates
    assert model_quality.Parts(tmp_path / "q", settings, again["model"], "ae2").autoencoder_folder != here.autoencoder_folder
    explicit = next((tmp_path / "q").glob("explicit-*"))
    assert (explicit / "control_1.json").is_file() and (explicit / "guidance_grid.npz").is_file()
    assert (explicit / "generated_lung.json").is_file() and (explicit / "feature_sensitivity.json").is_file()
    assert not (parts / "control_1.json").exists() and (parts / "texture.json").is_file()
    other_default = model_quality.Parts(tmp_path / "q", settings, again["model"] + "-w1", "ae1", "weights1")
    same_weights = model_quality.Parts(tmp_path / "q", settings, again["model"], "ae1", "weights1")
    assert other_default.folder != same_weights.folder  # the default guidance's sections (texture, spacings) differ
    assert other_default.explicit_folder == same_weights.explicit_folder  # sections at explicit settings are shared


def test_texture_fidelity_inserts_the_phantoms_own_outlines_of_each_level_and_compares_pairs(
        smoke_models, phantom_dataset, monkeypatch):
    from lsdm_aug.benchmarks import model_quality
    from lsdm_aug.config import rating_level
    from lsdm_aug.data.prepared import PreparedDataset, unit_to_hu
    from lsdm_aug.pipeline import LSDMPipeline

    pipe = LSDMPipeline.from_pretrained(str(smoke_models), device="cpu")
    test = PreparedDataset(phantom_dataset, split="test")
    backgrounds = model_quality.test_backgrounds(test, 2)
    phantom = {}  # level -> [(nodule id, its mean HU in the phantom, its rim's)] of the non-calcified test nodules
    for row in test.features.itertuples():
        mask = test[row.case_id]["nodule_mask"] == row.nodule_index
        if rating_level(row.calcification, 6) == 6 and mask.any():
            hu = unit_to_hu(test[row.case_id]["image"])
            core_px = max(1, round(model_quality.RIM_MM / float(test[row.case_id]["spacing_mm"])))
            rim = mask & ~ndimage.binary_erosion(mask, iterations=core_px)
            phantom.setdefault(rating_level(row.texture), []).append((row.nodule_id, hu[mask].mean(), hu[rim].mean()))
    assert phantom, "the fixture's test split must hold non-calcified nodules"
    asked, outlines = [], []
    insert, outline = pipe.insert, model_quality._outline
    monkeypatch.setattr(pipe, "insert", lambda *a, **k: asked.append(k["conditioning"]) or insert(*a, **k))
    monkeypatch.setattr(model_quality, "_outline", lambda nodule_id, sp: outlines.append(nodule_id) or outline(nodule_id, sp))
    result = model_quality.texture_fidelity(pipe, backgrounds, test, count=3, steps=2, seed=0, crop_spacing_mm=2.8)
    assert result["paired"]
    for level in range(1, 6):
        entry, nodules = result["levels"][str(level)], phantom.get(level, [])
        if not nodules:
            assert entry["inserted"] == 0 and entry["inserted_mean_hu"] is None
            continue
        chosen = [nodules[i % len(nodules)] for i in range(3)]  # the level's own nodules, in turn
        assert entry["inserted"] == 3 and entry["phantom_nodules"] == len(nodules)
        assert entry["phantom_mean_hu"] == pytest.approx(np.mean([hu for _, hu, _ in chosen]))
        assert entry["phantom_rim_hu"] == pytest.approx(np.mean([rim for _, _, rim in chosen]))
        assert entry["inserted_rim_hu"] is not None
        if entry["inserted_core_hu"] is not None:  # a nodule with a core: its rim is not the whole nodule
            assert entry["inserted_rim_hu"] != pytest.approx(entry["inserted_mean_hu"])
    expected_ids = [nodules[i % len(nodules)][0] for level, nodules in sorted(phantom.items()) for i in range(3)]
    assert outlines == expected_ids
    # the U-Net (conditioned on calcification) was told each outline's real nodule is not calcified
    assert len(asked) == len(expected_ids) and all(told["calcification"] == 6.0 for told in asked)


def test_two_workers_split_the_sections_and_give_the_same_figures(tmp_path, smoke_models, phantom_dataset):
    base = dict(data=str(phantom_dataset), model=str(smoke_models), count=2, steps=2, evaluator_steps=2,
                generated_slices=2, features=("malignancy",), other_spacings=((2.8, 128),),
                settings=(GuidanceSetting("none", 0.0, 0.0), GuidanceSetting("cfg w=2", 0.0, 2.0),
                          GuidanceSetting("classifier s=1", 1.0, 0.0)))
    two = run_model_quality(QualitySettings(**base, out=str(tmp_path / "two")), progress=False, workers=2)
    one = run_model_quality(QualitySettings(**base, out=str(tmp_path / "one")), progress=False)
    assert two["control"]["per_feature"] == one["control"]["per_feature"]
    for a, b in zip(two["control"]["guidance_alone"], one["control"]["guidance_alone"]):
        assert a["auc"] == b["auc"]
    assert two["other_spacings"]["2.8"]["levels"].keys() == one["other_spacings"]["2.8"]["levels"].keys()
    with pytest.raises(ValueError, match="workers must be 1 or 2, got 3"):
        run_model_quality(QualitySettings(**base, out=str(tmp_path / "three")), progress=False, workers=3)


def test_a_raw_targets_setting_guides_to_the_ratings_and_restores_the_pipeline(smoke_models):
    from lsdm_aug.benchmarks.model_quality import DEFAULT_SETTINGS, _targets_of
    from lsdm_aug.pipeline import LSDMPipeline

    pipe = LSDMPipeline.from_pretrained(smoke_models, device="cpu")
    assert pipe.calibrated_targets and pipe.calibrations
    raw = next(s for s in DEFAULT_SETTINGS if s.raw_targets)
    assert (raw.guidance_scale, raw.cfg_scale) == (1.0, 1.0)  # the default, to compare with "both s=1 w=1"
    with pytest.raises(RuntimeError), _targets_of(pipe, raw):
        assert not pipe.calibrated_targets
        raise RuntimeError("an insertion failed")
    assert pipe.calibrated_targets


def test_core_and_rim_are_measured_in_millimetres_and_cores_compared_in_pairs():
    from lsdm_aug.benchmarks.model_quality import Inserted, _paired_means, core_and_rim_hu

    yy, xx = np.mgrid[:41, :41]
    radius = np.hypot(yy - 20, xx - 20)
    mask, hu = radius <= 10, np.where(radius <= 5, 0.0, -600.0)  # a dense core 5 px across inside a fainter shell
    fine = core_and_rim_hu(hu, mask, spacing_mm=0.28)  # 1.4 mm = 5 px: the core is mostly the dense part
    coarse = core_and_rim_hu(hu, mask, spacing_mm=1.4)  # 1.4 mm = 1 px: the core takes in most of the shell
    assert fine[1] == -600.0 and fine[0] > -100.0 and coarse[0] < fine[0] - 200.0
    with pytest.raises(ValueError, match="spacing_mm and rim_mm must be > 0, got 0.7 and 0"):
        core_and_rim_hu(hu, mask, spacing_mm=0.7, rim_mm=0)
    inserted = Inserted(np.zeros((3, 1, 1)), np.array([-1.0, -2.0, -3.0]), np.zeros(3), np.ones(3, bool),
                        core_hu=np.array([10.0, np.nan, 30.0]), rim_hu=np.array([-5.0, -6.0, -7.0]))
    pairs = np.array([[0.0, 100.0, -1.0], [0.0, 200.0, -2.0], [0.0, np.nan, -3.0]])
    means = _paired_means(inserted, pairs)  # only the first nodule has a core on both sides
    assert (means["inserted_core_hu"], means["phantom_core_hu"], means["cored"]) == (10.0, 100.0, 1)
    assert means["inserted_rim_hu"] == -6.0 and means["phantom_rim_hu"] == -2.0
    assert _paired_means(None, np.empty((0, 3)))["inserted_mean_hu"] is None


def test_the_phantom_nodule_is_compared_as_imaged_at_the_spacing_it_was_inserted_at(smoke_models, phantom_dataset):
    from lsdm_aug.benchmarks import model_quality
    from lsdm_aug.config import rating_level
    from lsdm_aug.data.prepared import PreparedDataset, unit_to_hu
    from lsdm_aug.pipeline import LSDMPipeline

    pipe = LSDMPipeline.from_pretrained(str(smoke_models), device="cpu")
    test = PreparedDataset(phantom_dataset, split="test")
    row = next(r for r in test.features.itertuples() if rating_level(r.calcification, 6) == 6)
    case = test[row.case_id]
    own = float(case["spacing_mm"])
    backgrounds = model_quality.phantom_backgrounds(own / 2, 128, 2, 0)  # pixels half the phantom slice's side
    result = model_quality.texture_fidelity(pipe, backgrounds, test, count=2, steps=2, seed=0, crop_spacing_mm=own)
    entry = result["levels"][str(rating_level(row.texture))]
    mask = case["nodule_mask"] == row.nodule_index
    hu, imaged = model_quality.imaged_at(unit_to_hu(case["image"]), mask, own, own / 2)
    assert imaged.sum() > mask.sum()  # the same nodule on the finer grid
    assert entry["phantom_mean_hu"] == pytest.approx(float(hu[imaged].mean()), abs=1e-3)
    assert entry["phantom_native_mean_hu"] == pytest.approx(float(unit_to_hu(case["image"])[mask].mean()), abs=1e-3)
    assert result["phantom_imaged_at_insertion_spacing"]


def test_a_coarser_scanner_integrates_what_its_pixels_cover():
    from lsdm_aug.benchmarks.model_quality import imaged_at

    hu = np.full((128, 128), -800.0)
    mask = np.hypot(*(np.mgrid[:128, :128] - 63.5)) <= 6  # 12 px across at 0.7 mm: 8.4 mm
    hu[mask] = 0.0
    same, kept = imaged_at(hu, mask, 0.7, 0.71)
    assert same is hu and kept is mask  # within 2 %: the slice itself
    coarse, coarse_mask = imaged_at(hu, mask, 0.7, 2.8)
    assert coarse.shape == (32, 32) and coarse_mask.sum() * 2.8**2 == pytest.approx(mask.sum() * 0.7**2, rel=0.35)
    assert -800.0 < coarse[coarse_mask].mean() < -100.0  # its 3 px all partly lung
    assert coarse.mean() == pytest.approx(hu.mean(), abs=5.0)  # integrating keeps the HU of the whole
    with pytest.raises(ValueError, match=r"square slice and its mask, got \(128, 64\)"):
        imaged_at(hu[:, :64], mask[:, :64], 0.7, 2.8)


def test_the_model_card_says_which_window_local_edits_run_on(tmp_path, smoke_models):
    from lsdm_aug.benchmarks.model_card import model_card

    model = tmp_path / "model"
    shutil.copytree(smoke_models, model)
    assert "local edits, which run on exactly the window size it trained on" in model_card(model, "data", ["train"])
    config = json.loads((model / "unet.json").read_text())
    (model / "unet.json").write_text(json.dumps({**config, "edit_window_px": 48}))
    card = model_card(model, "data", ["train"])
    assert "local edits, which run on windows of 48 px or more" in card and "1.5 of the side it trained on" in card


@pytest.mark.parametrize(("field", "value", "named"), [("count", 1, r"count must be >= 2 \(an AUC needs both classes\), got 1"),
                                                      ("steps", 0, "steps must be in 1..1000, got 0"),
                                                      ("max_redraws", -1, "max_redraws must be an int >= 0, got -1"),
                                                      ("max_redraws", True, "max_redraws must be an int >= 0, got True")])
def test_bad_settings_are_named(field, value, named):
    with pytest.raises(ValueError, match=named):
        QualitySettings(data="x", **{field: value})


def test_sections_written_before_the_intervals_still_make_the_table():
    from lsdm_aug.benchmarks.model_quality import control_table

    old = {"per_feature": {"texture": 0.9}, "saturated": 0.0,
           "guidance_alone": {"setting": "none", "auc": 0.5, "nodule_frechet": 2.0}}
    new = {"per_feature": {"texture": 0.95}, "per_feature_interval": {"texture": [0.9, 1.0]}, "saturated": 0.0,
           "guidance_alone": {"setting": "both", "auc": 0.6, "auc_interval": [0.5, 0.7], "nodule_frechet": 1.0}}
    table = control_table([old, new])
    assert table["per_feature_interval"]["texture"] == {"none": None, "both": [0.9, 1.0]}
    assert [p["frechet_vs_none"] for p in table["guidance_alone"]] == [1.0, 0.5]
