"""Recipes: the built-ins load and build their networks; typos and wrong types are errors that name the key."""

from __future__ import annotations

import pytest
import torch

from lsdm_aug.config import RecipeError, load_recipe, recipe_from_dict
from lsdm_aug.models.autoencoder import build_autoencoder
from lsdm_aug.models.classifiers import build_classifier
from lsdm_aug.models.unet import SemanticCondition, build_unet, predict_noise

BUILT_IN = ("phantom-smoke", "phantom-128", "lidc-512")


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_recipe_has_an_f4_autoencoder_with_3_latent_channels(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.autoencoder.downsampling == 4
    assert recipe.autoencoder.latent_channels == 3
    assert recipe.image_size % recipe.autoencoder.downsampling == 0
    assert set(recipe.classifiers.features) == {"malignancy", "lobulation", "spiculation", "texture"}


@pytest.mark.parametrize("name", ["phantom-smoke", "phantom-128"])
def test_small_recipes_build_networks_that_run(name):
    recipe = load_recipe(name)
    autoencoder = build_autoencoder(recipe.autoencoder)
    unet = build_unet(recipe.diffusion, recipe.autoencoder.latent_channels)
    size = recipe.image_size
    with torch.no_grad():
        latent = autoencoder.encode_stage_2_inputs(torch.zeros(1, 1, size, size))
        assert latent.shape == (1, 3, size // 4, size // 4)
        condition = SemanticCondition(latent, torch.zeros(1, 8, size, size))
        noise = predict_noise(unet, latent, torch.tensor([5]), condition)
        assert noise.shape == latent.shape
        crop = torch.zeros(2, 1, recipe.classifiers.crop_px, recipe.classifiers.crop_px)
        for feature in recipe.classifiers.features:
            output = build_classifier(recipe.classifiers, feature)(crop, torch.tensor([0, 999]))
            assert output.shape == (2, 2 if feature == "malignancy" else 1)


def test_lidc_512_builds_on_cpu_and_is_the_largest():
    """The thesis setting constructs on CPU (no forward at 512 px) and is far larger than the CPU recipes."""
    counts = {}
    for name in BUILT_IN:
        recipe = load_recipe(name)
        unet = build_unet(recipe.diffusion, recipe.autoencoder.latent_channels)
        assert unet.in_channels == 6 and unet.out_channels == 3
        counts[name] = [parameter_count(build_autoencoder(recipe.autoencoder)), parameter_count(unet)]
        counts[name] += [parameter_count(build_classifier(recipe.classifiers, f)) for f in recipe.classifiers.features]
        del unet
    for part in range(len(counts["lidc-512"])):
        assert counts["phantom-smoke"][part] < counts["phantom-128"][part] < counts["lidc-512"][part]
    assert counts["lidc-512"][1] > 50_000_000  # 4 levels of 128..512 channels with attention


def test_unknown_recipe_name_lists_the_built_ins():
    with pytest.raises(RecipeError) as error:
        load_recipe("nope")
    message = str(error.value)
    assert "'nope'" in message
    for name in BUILT_IN:
        assert name in message


def write_recipe(tmp_path, text: str):
    path = tmp_path / "custom.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "key"), [
    ("image_size: 64\nimage_sise: 64\n", "image_sise"),
    ("autoencoder: {chanels: [8, 16, 16]}\n", "autoencoder.chanels"),
    ("train_diffusion: {step: 10}\n", "train_diffusion.step"),
])
def test_unknown_key_is_named(tmp_path, text, key):
    with pytest.raises(RecipeError, match=rf"unknown key {key}\b") as error:
        load_recipe(write_recipe(tmp_path, text))
    assert "allowed:" in str(error.value)


@pytest.mark.parametrize(("text", "key"), [
    ("image_size: big\n", "image_size"),
    ("image_size: 64.5\n", "image_size"),
    ("train_diffusion: {steps: true}\n", "train_diffusion.steps"),
    ("autoencoder: {channels: 8}\n", "autoencoder.channels"),
    ("autoencoder: {channels: [8, 16.5, 16]}\n", "autoencoder.channels[1]"),
    ("autoencoder: {attention: 'yes'}\n", "autoencoder.attention"),
    ("diffusion: {attention_levels: [0, 0, 1]}\n", "diffusion.attention_levels[0]"),
    ("classifiers: [8, 16]\n", "classifiers"),
    # floats: text that is not a number, or a bool, is refused
    ("train_autoencoder: {learning_rate: fast}\n", "train_autoencoder.learning_rate"),
    ("diffusion: {beta_start: true}\n", "diffusion.beta_start"),
])
def test_wrong_type_is_named(tmp_path, text, key):
    with pytest.raises(RecipeError) as error:
        load_recipe(write_recipe(tmp_path, text))
    assert str(error.value).startswith(key + " ") or f" {key} " in f" {error.value} "


def test_inconsistent_values_are_refused():
    with pytest.raises(RecipeError, match="attention_levels"):
        recipe_from_dict({"diffusion": {"channels": [16, 16, 32], "attention_levels": [False, True]}})
    with pytest.raises(RecipeError, match="image_size 66"):
        recipe_from_dict({"image_size": 66})
    with pytest.raises(RecipeError, match="beta_schedule"):
        recipe_from_dict({"diffusion": {"beta_schedule": "cosine"}})


def test_a_yaml_recipe_overrides_only_what_it_names(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, "image_size: 64\ntrain_diffusion: {steps: 12, learning_rate: 1}\n"))
    assert recipe.name == "custom"
    assert recipe.train_diffusion.steps == 12
    assert recipe.train_diffusion.learning_rate == 1.0 and isinstance(recipe.train_diffusion.learning_rate, float)
    assert recipe.train_diffusion.batch_size == 16  # the default
    assert recipe.autoencoder.channels == (32, 64, 64)  # lists become tuples


def test_yaml_exponent_without_a_dot_is_read_as_a_number(tmp_path):
    """YAML 1.1 reads ``1e-4`` as text; a recipe means the number."""
    path = tmp_path / "exponent.yaml"
    path.write_text("train_autoencoder: {learning_rate: 1e-4}\n")
    assert load_recipe(path).train_autoencoder.learning_rate == pytest.approx(1e-4)
