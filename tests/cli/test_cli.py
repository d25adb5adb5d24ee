"""The ``lsdm-aug`` command line: prepare, preview, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from lsdm_aug.cli import app
from lsdm_aug.data.prepared import PreparedDataset

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "prepare" in result.output and "preview" in result.output


def test_prepare_phantom_then_preview(tmp_path):
    out = tmp_path / "phantom"
    result = invoke("prepare", "phantom", "--out", out, "--count", 10, "--size", 64, "--seed", 5,
                    "--slices-per-patient", 2, "--nodule-free-fraction", 0.2)
    assert result.exit_code == 0, result.output
    dataset = PreparedDataset(out)
    assert len(dataset) == 10
    assert dataset[0]["image"].shape == (64, 64)
    assert json.loads((out / "dataset.json").read_text())["seed"] == 5
    cases = pd.read_csv(out / "cases.csv")
    assert cases.patient_id.nunique() == 5
    png = tmp_path / "grid.png"
    result = invoke("preview", out, "--out", png, "--count", 3)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_rerunning_prepare_continues_and_a_different_dataset_is_refused(tmp_path):
    out = tmp_path / "phantom"
    args = ("prepare", "phantom", "--out", out, "--count", 6, "--size", 64)
    assert invoke(*args).exit_code == 0
    first = (out / "features.csv").read_text()
    (out / "cases" / "phantom_000003.npz").unlink()
    assert invoke(*args).exit_code == 0
    assert (out / "features.csv").read_text() == first
    result = invoke("prepare", "phantom", "--out", out, "--count", 6, "--size", 64, "--seed", 1)
    assert result.exit_code == 2
    assert "holds a different dataset" in result.output and "seed" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--count", 0), "--count must be > 0, got 0"),
        (("--size", 100), "--size must be one of 64, 128, 256, 512, got 100"),
        (("--nodule-free-fraction", 1.5), "nodule_free_fraction must be in [0, 1], got 1.5"),
        (("--balance", "colour"), "got 'colour'"),
        (("--val-fraction", 0.6, "--test-fraction", 0.5), "must be < 1"),
    ],
)
def test_prepare_phantom_bad_input_is_one_line_exit_2(tmp_path, args, message):
    result = invoke("prepare", "phantom", "--out", tmp_path / "out", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_prepare_into_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = invoke("prepare", "phantom", "--out", target, "--count", 2)
    assert result.exit_code == 2 and "is a file, not a folder" in result.output


def test_prepare_lidc_bad_roots(tmp_path):
    result = invoke("prepare", "lidc", "--dicom-root", tmp_path / "missing", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "is not an existing folder" in result.output
    (tmp_path / "empty").mkdir()
    result = invoke("prepare", "lidc", "--dicom-root", tmp_path / "empty", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "no LIDC series" in result.output
    assert not (tmp_path / "out").exists()


def test_preview_of_a_folder_that_is_not_a_dataset(tmp_path):
    result = invoke("preview", tmp_path, "--out", tmp_path / "grid.png")
    assert result.exit_code == 2 and "is not a prepared dataset" in result.output


@pytest.mark.parametrize("command", [["synthesize"], ["bank", "build"]])
@pytest.mark.parametrize(("args", "message"), [
    (["--count", "0"], "--count must be > 0, got 0"),
    (["--guidance-scale", "-1"], "--guidance-scale must be >= 0, got -1.0"),
    (["--cfg-scale", "-0.5"], "--cfg-scale must be >= 0, got -0.5"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
])
def test_generating_commands_refuse_the_same_options_alike(tmp_path, command, args, message):
    out = tmp_path / "out"
    result = invoke(*command, "--out", out, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()
