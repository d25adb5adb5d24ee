"""Calibrated guidance targets: measured per level and timestep, stored beside the classifier, used by the pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lsdm_aug.cli import app
from lsdm_aug.config import load_recipe
from lsdm_aug.models.checkpoint import CheckpointError, weights_digest
from lsdm_aug.pipeline import LSDMPipeline
from lsdm_aug.sampling.guidance import TargetCalibration
from lsdm_aug.sampling.schedulers import training_scheduler
from lsdm_aug.training.calibration import calibrate, calibrate_classifiers, calibration_timesteps

REGRESSIONS = ("lobulation", "spiculation", "texture")


class MeanOfImage(torch.nn.Module):
    """A 'classifier' predicting the mean of its image, times ``gain``."""

    def __init__(self, gain: float = 1.0) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, images: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.gain * images.mean(dim=(1, 2, 3))[:, None]


def test_calibrate_averages_each_level_at_each_timestep():
    """Crops whose every value is their level: at t = 0 a mean-of-image classifier says the level (the
    schedule's first step barely noises); at the last step only noise is left, mean about 0."""
    ratings = np.array([1.0, 1.0, 2.4, 2.0, 5.0, 5.0, 5.0, 4.6] * 8)  # 2.4 rounds to 2, 4.6 to 5
    crops = torch.tensor(ratings, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 4, 4).contiguous()
    scheduler = training_scheduler(load_recipe("phantom-smoke").diffusion)
    tables = calibrate({"texture": MeanOfImage(), "lobulation": MeanOfImage(2.0)}, lambda z: z, crops,
                       {"texture": ratings, "lobulation": ratings}, (0, 999), scheduler, seed=0)
    texture = tables["texture"]
    assert texture.levels == (1.0, 2.0, 5.0) and texture.counts == (16, 16, 32)
    assert np.allclose(texture.means[0], [1.0, 2.2, 4.9], atol=0.05)
    assert np.allclose(texture.means[1], 0.0, atol=0.15)
    assert np.allclose(tables["lobulation"].means[0], 2 * np.array(texture.means[0]), atol=1e-5)  # same noise


def test_calibrate_needs_a_rating_per_crop():
    scheduler = training_scheduler(load_recipe("phantom-smoke").diffusion)
    with pytest.raises(ValueError, match="texture: need one rating per crop.*2 crops and 3 ratings"):
        calibrate({"texture": MeanOfImage()}, lambda z: z, torch.zeros(2, 3, 4, 4), {"texture": np.ones(3)},
                  (0,), scheduler)


def test_calibration_timesteps_span_the_schedule():
    assert calibration_timesteps(1000) == (0, 100, 200, 300, 400, 500, 599, 699, 799, 899, 999)
    assert calibration_timesteps(10, points=3) == (0, 4, 9)


def test_trained_classifiers_carry_their_calibration(smoke_models):
    """train_classifiers calibrates its regressions at the end; malignancy (a classification) has none."""
    for feature in REGRESSIONS:
        config = json.loads((smoke_models / f"classifier_{feature}.json").read_text())
        table = TargetCalibration.from_dict(config["calibration"])
        assert table.timesteps == calibration_timesteps(1000) and sum(table.counts) > 0
    assert "calibration" not in json.loads((smoke_models / "classifier_malignancy.json").read_text())
    pipe = LSDMPipeline.from_pretrained(smoke_models, device="cpu")
    assert sorted(pipe.calibrations) == list(REGRESSIONS)


def test_calibrating_changes_the_model_id_and_the_guided_nodule(copy_models, phantom_dataset):
    models = copy_models()
    for feature in REGRESSIONS:  # back to an uncalibrated model, as shipped before calibration existed
        path = models / f"classifier_{feature}.json"
        config = json.loads(path.read_text())
        config.pop("calibration")
        path.write_text(json.dumps(config))
    before = weights_digest(models)
    raw = LSDMPipeline.from_pretrained(models, device="cpu")
    assert raw.calibrations == {}
    tables = calibrate_classifiers(load_recipe("phantom-smoke"), phantom_dataset, models, device="cpu", per_level=4)
    assert sorted(tables) == list(REGRESSIONS)
    assert weights_digest(models) != before
    calibrated = LSDMPipeline.from_pretrained(models, device="cpu")
    assert calibrated.model_id != raw.model_id
    assert calibrated.calibrations["texture"] == tables["texture"]

    background = np.full((64, 64), -0.2, dtype=np.float32)
    semantic = np.full((64, 64), 4, dtype=np.uint8)
    outline = np.zeros((7, 7), dtype=bool)
    outline[1:6, 1:6] = True
    request = dict(centre=(32, 32), features={"texture": 5.0}, steps=3, seed=1, guidance_scale=4.0,
                   spacing_mm=raw.spacing_mm)
    guided = calibrated.insert(background, semantic, outline, **request).image
    calibrated.calibrated_targets = False
    assert np.array_equal(calibrated.insert(background, semantic, outline, **request).image,
                          raw.insert(background, semantic, outline, **request).image)
    assert not np.array_equal(guided, raw.insert(background, semantic, outline, **request).image)


def test_a_damaged_calibration_is_a_checkpoint_error(copy_models):
    models = copy_models()
    path = models / "classifier_texture.json"
    config = json.loads(path.read_text())
    config["calibration"]["means"] = [[1.0]]
    path.write_text(json.dumps(config))
    message = r"classifier_texture.safetensors.*means must be 11 timesteps x \d levels, got shape \(1, 1\)"
    with pytest.raises(CheckpointError, match=message):
        LSDMPipeline.from_pretrained(models, device="cpu")


def test_train_calibrate_command(copy_models, phantom_dataset):
    models = copy_models()
    runner = CliRunner()
    result = runner.invoke(app, ["train", "calibrate", "--recipe", "phantom-smoke", "--data", str(phantom_dataset),
                                 "--out", str(models), "--device", "cpu", "--per-level", "3"])
    assert result.exit_code == 0, result.output
    assert [line.split(":")[0] for line in result.output.splitlines()] == list(REGRESSIONS)
    assert json.loads((models / "classifier_texture.json").read_text())["calibration"]["counts"]
    bad = runner.invoke(app, ["train", "calibrate", "--recipe", "phantom-smoke", "--data", str(phantom_dataset),
                              "--out", str(models), "--per-level", "0"])
    assert bad.exit_code == 2 and "--per-level must be >= 1, got 0" in bad.output
