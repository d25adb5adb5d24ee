"""The SPADE GAN baseline: trains, resumes, and its generator maps label maps to slices of their size."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from lsdm_aug.cli import app
from lsdm_aug.config import load_recipe
from lsdm_aug.models.checkpoint import read_config
from lsdm_aug.training.spade_gan import SPADE_GAN_FILE, load_spade_gan, train_spade_gan


def test_spade_gan_trains_resumes_and_generates(tmp_path, phantom_dataset):
    recipe = load_recipe("phantom-smoke")
    result = CliRunner().invoke(app, ["train", "spade-gan", "--recipe", "phantom-smoke", "--data", str(phantom_dataset),
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    config = read_config(tmp_path / SPADE_GAN_FILE)
    assert config["steps"] == 4 and [h["step"] for h in config["history"]] == [2, 4]
    recipe.train_spade_gan.steps = 6  # resume: two more steps on top of the saved four
    train_spade_gan(recipe, phantom_dataset, tmp_path, device="cpu", progress=False)
    assert [h["step"] for h in read_config(tmp_path / SPADE_GAN_FILE)["history"]] == [2, 4, 6]
    generate = load_spade_gan(tmp_path)
    maps = torch.zeros(2, 1, 64, 64, dtype=torch.long)
    maps[1, 0, 10:40, 10:40] = 4
    slices = generate(maps)
    assert slices.shape == (2, 1, 64, 64) and slices.abs().max() <= 1
    assert not torch.equal(slices[0], slices[1])  # the map decides the slice
