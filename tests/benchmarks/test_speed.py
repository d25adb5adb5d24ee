"""``lsdm-aug benchmark speed`` runs end to end on the smoke models and reports every part."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lsdm_aug.benchmarks.speed import SpeedSettings, run_speed
from lsdm_aug.cli import app


@pytest.mark.slow
def test_speed_benchmark_reports_every_part(tmp_path, smoke_models):
    settings = SpeedSettings(model=str(smoke_models), out=str(tmp_path), repeats=1, steps=(2, 3), transform_samples=3,
                             transform_steps=2, batch_size=2, bank_size=3, synth_count=2)
    run_speed(settings)
    report = json.loads((tmp_path / "speed.json").read_text())
    assert [(r["steps"], r["guided"]) for r in report["generation_and_insertion"]] == [
        (2, False), (2, True), (3, False), (3, True)]
    assert all(r["generate_s"] > 0 and r["insert_s"] > 0 for r in report["generation_and_insertion"])
    latent_vs_pixel = report["latent_vs_pixel"]
    # same U-Net recipe: nearly the same parameters, but 16x the positions at f=4 -> many more FLOPs per step
    assert abs(latent_vs_pixel["latent"]["parameters"] - latent_vs_pixel["pixel"]["parameters"]) < 0.01 * \
        latent_vs_pixel["latent"]["parameters"]
    assert latent_vs_pixel["pixel"]["flops_per_step"] > 8 * latent_vs_pixel["latent"]["flops_per_step"]
    assert 0 < report["flops"]["fraction_of_matmul"] < 1
    for mode in ("live", "batch", "bank"):
        transforms = report["transforms"][mode]
        assert transforms["samples"] == 3 and 0 < transforms["changed_share"]["mean"] < 0.2
    rates = report["transforms"]["synthesize"]
    assert [(r["batch_size"], r["ray"]) for r in rates] == [(1, None), (2, None), (2, "local")]  # Ray: one task per core
    assert all(r["cases_per_minute"] > 0 for r in rates)
    profile = report["transforms"]["synthesize_profile"]
    assert set(profile["stages"]) == {"phantom drawing", "semantic map (K-means lung)",
                                      "diffusion (encode, sample, decode)", "writing (NIfTI, manifest)"}
    assert all(v > 0 for v in profile["stages"].values())  # each stage found in the profile
    assert sum(profile["stages"].values()) <= profile["seconds_per_case"]
    text = (tmp_path / "speed.md").read_text()
    assert "| bank (Poisson placement) | 3 |" in text and "Pixel space costs" in text
    assert "| 2, Ray local (one task per core) | 2 |" in text and "| phantom drawing |" in text


def test_speed_cli_names_bad_step_lists(tmp_path):
    result = CliRunner().invoke(app, ["benchmark", "speed", "--steps", "10,x", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--steps must be comma-separated integers, got '10,x'" in result.output
