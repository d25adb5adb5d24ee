"""``lsdm-aug train``: thin commands over the training functions; user errors are one line and exit code 2."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lsdm_aug.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def test_train_autoencoder_writes_weights(phantom_dataset, tmp_path):
    out = tmp_path / "models"
    result = invoke("train", "autoencoder", "--recipe", "phantom-smoke", "--data", phantom_dataset, "--out", out,
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (out / "autoencoder.safetensors").stat().st_size > 0
    config = json.loads((out / "autoencoder.json").read_text())
    assert config["steps"] == 6 and config["scale_factor"] > 0
    assert "autoencoder in" in result.output and "ssim" in result.output


def test_unknown_recipe_is_one_line_naming_the_built_ins(phantom_dataset, tmp_path):
    result = invoke("train", "autoencoder", "--recipe", "nope", "--data", phantom_dataset, "--out", tmp_path / "m")
    assert result.exit_code == 2
    lines = error_lines(result)
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ") and "'nope'" in lines[0]
    for name in ("phantom-smoke", "phantom-128", "lidc-512"):
        assert name in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "m" / "autoencoder.safetensors").exists()


def test_data_that_is_not_a_prepared_dataset_exits_2(tmp_path):
    result = invoke("train", "autoencoder", "--recipe", "phantom-smoke", "--data", tmp_path, "--out", tmp_path / "m")
    assert result.exit_code == 2
    lines = error_lines(result)
    assert len(lines) == 1 and "--data" in lines[0] and "not a prepared dataset" in lines[0]


def test_train_diffusion_without_an_autoencoder_names_the_missing_file(phantom_dataset, tmp_path):
    out = tmp_path / "models"
    result = invoke("train", "diffusion", "--recipe", "phantom-smoke", "--data", phantom_dataset, "--out", out)
    assert result.exit_code == 2, result.output
    lines = error_lines(result)
    assert len(lines) == 1, result.output
    assert str(out / "autoencoder.") in lines[0] and "missing" in lines[0]
    assert "Traceback" not in result.output


def test_train_classifiers_without_an_autoencoder_exits_2(phantom_dataset, tmp_path):
    result = invoke("train", "classifiers", "--recipe", "phantom-smoke", "--data", phantom_dataset,
                    "--out", tmp_path / "models")
    assert result.exit_code == 2
    assert "autoencoder" in error_lines(result)[0]


def test_out_that_is_a_file_exits_2(phantom_dataset, tmp_path):
    out = tmp_path / "file"
    out.write_text("")
    result = invoke("train", "autoencoder", "--recipe", "phantom-smoke", "--data", phantom_dataset, "--out", out)
    assert result.exit_code == 2 and "is a file" in result.output


def test_steps_and_init_from_override_the_recipe(phantom_dataset, smoke_models, tmp_path):
    import shutil

    out = tmp_path / "models"
    out.mkdir()
    for name in ("autoencoder.safetensors", "autoencoder.json"):
        shutil.copy(smoke_models / name, out / name)
    result = invoke("train", "diffusion", "--recipe", "phantom-smoke", "--data", phantom_dataset, "--out", out,
                    "--device", "cpu", "--steps", 3, "--init-from", smoke_models)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "unet.json").read_text())
    assert config["steps"] == 3 and config["training"]["init_from"] == str(smoke_models)
    for args, message in ((("--steps", 0), "--steps must be > 0, got 0"),
                          (("--init-from", tmp_path / "nowhere"), "nowhere")):
        bad = invoke("train", "diffusion", "--recipe", "phantom-smoke", "--data", phantom_dataset, "--out", out, *args)
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output
