"""lsdm-aug synthesize: nnU-Net layout, balance, determinism, resume after interruption, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from lsdm_aug.cli import app
from lsdm_aug.data.nnunet_format import case_paths, read_case
from lsdm_aug.synthesis import SynthesisRequest, case_features, parse_level_option, synthesize

runner = CliRunner()


def _request(models, **overrides) -> SynthesisRequest:
    return SynthesisRequest(**{"count": 5, "size": 64, "steps": 2, "model": str(models), **overrides})


def test_level_options_and_balance():
    assert parse_level_option("malignancy", "4") == 4
    assert parse_level_option("texture", "3-5") == (3, 5) and parse_level_option("texture", "3..5") == (3, 5)
    with pytest.raises(ValueError, match="--malignancy must be a level 1..5 or a range like 3-5 within 1..5, got '6'"):
        parse_level_option("malignancy", "6")
    default = SynthesisRequest(count=10)
    assert [case_features(default, i)["malignancy"] for i in range(10)].count(3.0) == 2  # 1..5, evenly
    both = SynthesisRequest(count=20, features={"texture": (4, 5)}, balance=("malignancy",))
    combos = pd.DataFrame([case_features(both, i) for i in range(20)]).value_counts()
    assert len(combos) == 10 and combos.max() == combos.min() == 2
    fixed = SynthesisRequest(count=3, features={"malignancy": 4})
    assert all(case_features(fixed, i) == {"malignancy": 4.0} for i in range(3))
    with pytest.raises(ValueError, match="count must be > 0, got 0"):
        SynthesisRequest(count=0)


def test_synthesize_writes_an_nnunet_dataset_with_a_manifest(tmp_path, smoke_models):
    out = tmp_path / "Dataset501_Synth"
    manifest = synthesize(out, _request(smoke_models, features={"malignancy": (4, 5)}))
    assert len(manifest) == 5 and manifest.case_id.is_unique
    assert set(manifest.malignancy_asked) == {4.0, 5.0}
    assert (manifest.source_malignancy.apply(lambda m: int(m + 0.5)) == manifest.malignancy_asked).all()
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["numTraining"] == 5 and dataset["labels"] == {"background": 0, "nodule": 1}
    assert dataset["file_ending"] == ".nii.gz" and dataset["channel_names"] == {"0": "CT"}
    for case_id in manifest.case_id:
        image, label, spacing = read_case(out, case_id)
        assert image.shape == label.shape == (64, 64)
        assert label.sum() > 0 and set(label.ravel()) <= {0, 1}
        assert spacing[0] > 4  # 64 px phantom: ~5.5 mm pixels
    assert pd.read_csv(out / "manifest.csv").case_id.tolist() == manifest.case_id.tolist()


def test_same_seed_same_output_and_interrupted_runs_finish_identically(tmp_path, smoke_models):
    request = _request(smoke_models, seed=3)
    whole = tmp_path / "whole"
    synthesize(whole, request)
    broken = tmp_path / "broken"
    shutil.copytree(whole, broken)
    # what a kill leaves: a case without its row, a half-written temporary file, no manifest yet
    (broken / ".lsdm-aug" / "rows" / "lsdm_000002.json").unlink()
    case_paths(broken, "lsdm_000004")[1].unlink()
    (broken / ".lsdm-aug" / "rows" / "lsdm_000004.json").unlink()
    (broken / "imagesTr" / ".lsdm_000004_0000.nii.gz.x.nii.gz").write_bytes(b"partial")
    (broken / "manifest.csv").unlink()
    synthesize(broken, request)
    assert (broken / "manifest.csv").read_text() == (whole / "manifest.csv").read_text()
    assert sorted(p.name for p in (broken / "imagesTr").iterdir()) == sorted(p.name for p in (whole / "imagesTr").iterdir())
    for case_id in ("lsdm_000002", "lsdm_000004"):
        for a, b in zip(read_case(whole, case_id)[:2], read_case(broken, case_id)[:2]):
            assert (a == b).all()


def test_the_outlines_appearance_is_told_by_default_and_recorded(tmp_path, smoke_models):
    from lsdm_aug.data.prepared import DatasetMismatchError
    from lsdm_aug.transforms.core import usable_nodule_table

    told = synthesize(tmp_path / "told", _request(smoke_models, count=3, features={"texture": 2}))
    sources = usable_nodule_table().set_index("nodule_id").loc[told.source_nodule_id]
    assert (told.texture_told.isna()).all()  # requested: nothing told
    assert told.calcification_told.tolist() == [float(int(c + 0.5)) for c in sources.calcification]
    off = tmp_path / "off"
    manifest = synthesize(off, _request(smoke_models, count=3, appearance_from_outline=False))
    assert manifest.texture_told.isna().all() and manifest.calcification_told.isna().all()
    # a folder written before the setting existed had it off: it resumes without it and is refused with it
    settings = off / ".lsdm-aug" / "settings.json"
    record = json.loads(settings.read_text())
    del record["appearance_from_outline"]
    settings.write_text(json.dumps(record))
    synthesize(off, _request(smoke_models, count=3, appearance_from_outline=False))
    with pytest.raises(DatasetMismatchError, match="differs in appearance_from_outline"):
        synthesize(off, _request(smoke_models, count=3))
    result = runner.invoke(app, ["synthesize", "--out", str(off), "--count", "3", "--size", "64", "--steps", "2",
                                 "--model", str(smoke_models), "--no-appearance-from-outline"])
    assert result.exit_code == 0, result.output


def test_a_folder_holding_another_dataset_is_refused_and_left_alone(tmp_path, smoke_models):
    out = tmp_path / "synth"
    synthesize(out, _request(smoke_models, count=2))
    before = sorted(p.name for p in out.rglob("*"))
    result = runner.invoke(app, ["synthesize", "--out", str(out), "--count", "3", "--size", "64", "--steps", "2",
                                 "--model", str(smoke_models)])
    assert result.exit_code == 2 and "holds a different synthetic dataset (differs in count)" in result.output
    assert sorted(p.name for p in out.rglob("*")) == before


@pytest.mark.parametrize(("args", "message"), [
    (["--count", "0"], "--count must be > 0, got 0"),
    (["--malignancy", "7"], "--malignancy must be a level 1..5"),
    (["--texture", "x"], "--texture must be a level 1..5 or a range like 3-5, got 'x'"),
    (["--model", "nonexistent-model"], "model 'nonexistent-model' is neither 'default', a shipped model"),
    (["--from", "."], "is not a dataset"),
    (["--balance", "malignancy", "--malignancy", "4"], "--balance malignancy needs a range or nothing"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--preview", "grid.jpg"], "--preview must name a .png file, got 'grid.jpg'"),
    (["--ray", "127.0.0.1:1"], "--ray '127.0.0.1:1'"),
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, smoke_models, args, message):
    out = tmp_path / "out"
    base = ["synthesize", "--out", str(out), "--count", "2", "--size", "64", "--steps", "2"]
    model = [] if "--model" in args else ["--model", str(smoke_models)]
    result = runner.invoke(app, base + model + args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_a_corrupt_model_is_a_one_line_error(tmp_path, copy_models):
    models = copy_models()
    (models / "unet.safetensors").write_bytes(b"not a safetensors file")
    result = runner.invoke(app, ["synthesize", "--out", str(tmp_path / "out"), "--count", "2", "--size", "64",
                                 "--model", str(models)])
    assert result.exit_code == 2 and "unet.safetensors" in result.output and "corrupt" in result.output
    assert not (tmp_path / "out").exists()


def test_insert_into_an_existing_prepared_dataset(tmp_path, smoke_models, phantom_dataset):
    manifest = synthesize(tmp_path / "from", _request(smoke_models, count=3, source=str(phantom_dataset)))
    assert manifest.background.str.startswith("phantom_").all()


@pytest.mark.slow
def test_nnunet_verifies_and_preprocesses_the_dataset(tmp_path, smoke_models):
    raw = tmp_path / "raw"
    synthesize(raw / "Dataset987_LsdmTest", _request(smoke_models, count=4))
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "res")}
    result = subprocess.run([sys.executable, "-m", "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
                             "-d", "987", "--verify_dataset_integrity", "-c", "2d", "-np", "1"],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "pre" / "Dataset987_LsdmTest" / "nnUNetPlans.json").is_file()


def _same_dataset(first, second) -> None:
    """The same cases: labels identical, HU identical but where a float difference of the order of 1e-6 (a batch
    runs its convolutions with other kernels than a single sample) rounds to the neighbouring integer."""
    assert (first / "manifest.csv").read_text() == (second / "manifest.csv").read_text()
    for case_id in pd.read_csv(first / "manifest.csv").case_id:
        (image_a, label_a), (image_b, label_b) = read_case(first, case_id)[:2], read_case(second, case_id)[:2]
        assert (label_a == label_b).all()
        difference = np.abs(image_a.astype(np.int32) - image_b.astype(np.int32))
        assert difference.max() <= 1 and (difference > 0).sum() <= 4


def test_the_batch_size_does_not_change_the_dataset(tmp_path, smoke_models):
    request = _request(smoke_models, seed=5, nodules_per_slice=2, features={"texture": (4, 5)})
    one, three = tmp_path / "one", tmp_path / "three"
    synthesize(one, request)
    synthesize(three, request, batch_size=3)
    _same_dataset(one, three)
    assert (pd.read_csv(one / "manifest.csv").nodules == 2).all()


def test_preview_draws_one_row_per_level(tmp_path, smoke_models):
    from matplotlib.image import imread

    result = runner.invoke(app, ["synthesize", "--out", str(tmp_path / "out"), "--count", "4", "--size", "64",
                                 "--steps", "2", "--model", str(smoke_models), "--malignancy", "4-5",
                                 "--preview", str(tmp_path / "grid.png"), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    grid = imread(tmp_path / "grid.png")
    assert grid.shape[0] > 100 and grid.shape[1] > 300 and grid[..., :3].std() > 0.05  # two rows of close-ups
    assert not list(tmp_path.glob(".*.png"))


@pytest.mark.slow
def test_a_local_ray_cluster_writes_the_single_machine_dataset(tmp_path, smoke_models):
    request = _request(smoke_models, count=4, seed=2)
    alone, spread = tmp_path / "alone", tmp_path / "ray"
    synthesize(alone, request)
    synthesize(spread, request, batch_size=1, ray_address="local")
    _same_dataset(alone, spread)


def _no_kmeans(*_args, **_kwargs):
    raise AssertionError("K-means lung segmentation ran on a background whose lung fields are known")


def test_phantom_and_prepared_backgrounds_bring_their_own_lung_fields(tmp_path, smoke_models, phantom_dataset,
                                                                      monkeypatch):
    monkeypatch.setattr("lsdm_aug.transforms.core.lung_mask_from_hu", _no_kmeans)
    assert len(synthesize(tmp_path / "phantom", _request(smoke_models, count=2))) == 2
    assert len(synthesize(tmp_path / "prepared", _request(smoke_models, count=2, source=str(phantom_dataset)))) == 2
    synthesize(tmp_path / "raw" / "Dataset986_Known", _request(smoke_models, count=2))
    with pytest.raises(AssertionError, match="K-means lung segmentation ran"):  # an nnU-Net set has no lung fields
        synthesize(tmp_path / "again", _request(smoke_models, count=1, source=str(tmp_path / "raw" / "Dataset986_Known")))


def test_the_manifest_records_the_pipelines_redraws(tmp_path, smoke_models, monkeypatch):
    from lsdm_aug import pipeline

    monkeypatch.setattr(pipeline, "is_saturated", lambda image, region: True)  # every draw saturated
    manifest = synthesize(tmp_path / "redrawn", _request(smoke_models, count=4))
    not_calcified = manifest.calcification_told == 6.0
    assert not_calcified.any()
    assert (manifest.redraws[not_calcified] == 2).all() and manifest.saturated[not_calcified].all()
    assert (manifest.redraws[~not_calcified] == 0).all() and not manifest.saturated[~not_calcified].any()
    monkeypatch.undo()
    plain = synthesize(tmp_path / "plain", _request(smoke_models, count=4))
    assert set(plain.redraws) <= {0, 1, 2} and plain.saturated.dtype == bool
