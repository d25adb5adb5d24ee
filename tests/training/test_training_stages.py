"""The three training stages on phantom data: what each writes, and that a rerun resumes where it stopped."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lsdm_aug.config import FEATURES, recipe_from_dict
from lsdm_aug.models.autoencoder import build_autoencoder
from lsdm_aug.models.checkpoint import load_weights, read_config
from lsdm_aug.models.classifiers import build_classifier
from lsdm_aug.models.unet import build_unet
from lsdm_aug.training import autoencoder as autoencoder_stage
from lsdm_aug.training.autoencoder import train_autoencoder
from lsdm_aug.training.classifiers import NoduleCrops, train_classifiers
from lsdm_aug.training.common import EMA
from lsdm_aug.training.diffusion import train_diffusion

SMOKE_STEPS = 6


def longer(recipe, stage: str, steps: int):
    """The smoke recipe with ``stage`` trained for ``steps`` steps (same name, so the state is resumed)."""
    values = recipe.to_dict()
    values[stage]["steps"] = steps
    return recipe_from_dict(values)


def read(path):
    return json.loads(path.read_text())


def test_each_stage_writes_weights_config_and_state(smoke_models):
    names = ["autoencoder", "autoencoder_state", "unet", "unet_state", "classifiers_state"]
    names += [f"classifier_{feature}" for feature in FEATURES]
    for name in names:
        assert (smoke_models / f"{name}.safetensors").stat().st_size > 0, name
        assert (smoke_models / f"{name}.json").is_file(), name
    for state in ("autoencoder_state", "unet_state", "classifiers_state"):
        meta = read(smoke_models / f"{state}.json")["meta"]
        assert meta["step"] == SMOKE_STEPS
        assert [entry["step"] for entry in meta["history"]] == [3, 6]


def test_autoencoder_config_has_a_positive_finite_scale_factor(smoke_models):
    config = read(smoke_models / "autoencoder.json")
    assert config["component"] == "autoencoder" and config["recipe"] == "phantom-smoke"
    assert isinstance(config["scale_factor"], float)
    assert math.isfinite(config["scale_factor"]) and config["scale_factor"] > 0
    assert config["steps"] == SMOKE_STEPS and config["image_size"] == 64
    assert {"ssim", "psnr_db", "blur_ssim", "blur_psnr_db"} <= set(config["validation"])


def test_saved_weights_load_into_the_recipe_networks(smoke_models, smoke_recipe):
    load_weights(smoke_models / "autoencoder.safetensors", build_autoencoder(smoke_recipe.autoencoder))
    unet_config = load_weights(smoke_models / "unet.safetensors",
                               build_unet(smoke_recipe.diffusion, smoke_recipe.autoencoder.latent_channels))
    assert unet_config["latent_channels"] == 3 and unet_config["steps"] == SMOKE_STEPS
    assert math.isfinite(unet_config["validation"]["validation_mse"])
    for feature in FEATURES:
        config = load_weights(smoke_models / f"classifier_{feature}.safetensors",
                              build_classifier(smoke_recipe.classifiers, feature))
        assert config["feature"] == feature and config["steps"] == SMOKE_STEPS


def assert_resumed(history_before, history_after):
    steps = [entry["step"] for entry in history_after]
    assert steps == [3, 6, 9]
    assert all(a < b for a, b in zip(steps, steps[1:]))
    assert history_after[:2] == history_before  # the earlier entries are kept, not recomputed


def test_autoencoder_resumes_from_the_saved_step(copy_models, phantom_dataset, smoke_recipe, monkeypatch):
    models = copy_models()
    before = read(models / "autoencoder.json")["history"]
    batches = []
    original = autoencoder_stage.random_crops
    monkeypatch.setattr(autoencoder_stage, "random_crops", lambda *a, **k: batches.append(1) or original(*a, **k))
    metrics = train_autoencoder(longer(smoke_recipe, "train_autoencoder", 9), phantom_dataset, models,
                                device="cpu", progress=False)
    assert len(batches) == 3  # steps 7, 8, 9 only
    assert metrics["step"] == 9
    config = read(models / "autoencoder.json")
    assert config["steps"] == 9 and config["scale_factor"] > 0
    assert_resumed(before, config["history"])
    assert read(models / "autoencoder_state.json")["meta"]["step"] == 9


def count_ema_updates(monkeypatch) -> list:
    calls = []
    original = EMA.update
    monkeypatch.setattr(EMA, "update", lambda self, model: calls.append(1) or original(self, model))
    return calls


def test_diffusion_resumes_from_the_saved_step(copy_models, phantom_dataset, smoke_recipe, monkeypatch):
    models = copy_models()
    before = read(models / "unet.json")["history"]
    updates = count_ema_updates(monkeypatch)
    train_diffusion(longer(smoke_recipe, "train_diffusion", 9), phantom_dataset, models, device="cpu", progress=False)
    assert len(updates) == 3
    config = read(models / "unet.json")
    assert config["steps"] == 9
    assert_resumed(before, config["history"])
    meta = read(models / "unet_state.json")["meta"]
    assert meta["step"] == 9 and meta["ema_updates"] == 9  # the EMA warm-up continues too


def test_a_resumed_diffusion_run_reads_its_encoded_slices_instead_of_encoding_again(copy_models, phantom_dataset,
                                                                                   smoke_recipe, monkeypatch):
    from lsdm_aug.training import diffusion as diffusion_stage

    models = copy_models()
    caches = sorted((models / diffusion_stage.LATENT_CACHE_DIR).glob("*.safetensors"))
    assert [p.name.split("-")[0] for p in caches] == ["train", "validation"]  # written by the first run
    encoded = []
    original = diffusion_stage.LatentData.encode
    monkeypatch.setattr(diffusion_stage.LatentData, "encode",
                        classmethod(lambda cls, *args, **kwargs: encoded.append(1) or original(*args, **kwargs)))
    cached = diffusion_stage.load_latent_crops(phantom_dataset, "train", *_smoke_encoder(models, smoke_recipe),
                                               crop_latent_px=8, factor=4, nodule_share=0.5, cache=caches[0])
    train_diffusion(longer(smoke_recipe, "train_diffusion", 9), phantom_dataset, models, device="cpu", progress=False)
    assert encoded == []
    fresh = diffusion_stage.LatentData.encode(
        diffusion_stage.load_split_arrays(phantom_dataset, "train", ("image", "semantic_map")),
        *_smoke_encoder(models, smoke_recipe))
    assert torch.allclose(cached.data.latents, fresh.latents) and torch.allclose(
        cached.data.semantic_latents, fresh.semantic_latents)
    before = diffusion_stage.latent_cache_path(models, phantom_dataset, "train", None)
    (models / "autoencoder.json").write_text((models / "autoencoder.json").read_text() + " ")
    assert diffusion_stage.latent_cache_path(models, phantom_dataset, "train", None) != before


def test_the_latent_cache_is_named_by_the_data_and_survives_damage(copy_models, phantom_dataset, smoke_recipe,
                                                                   tmp_path, monkeypatch):
    import shutil

    from lsdm_aug.training import diffusion as diffusion_stage

    models = copy_models()
    data = tmp_path / "data"
    shutil.copytree(phantom_dataset, data)
    path = diffusion_stage.latent_cache_path(models, data, "train", None)
    assert diffusion_stage.latent_cache_path(models, data, "train", 8) != path  # fewer slices
    case = next((data / "cases").iterdir())
    case.write_bytes(case.read_bytes())  # the dataset written again: other modification times
    assert diffusion_stage.latent_cache_path(models, data, "train", None) != path
    path = diffusion_stage.latent_cache_path(models, data, "train", None)
    stale = path.with_name("train-0000000000000000.safetensors")
    stale.parent.mkdir(parents=True, exist_ok=True)  # the copied models hold the smoke run's own encodings
    stale.write_bytes(b"an encoding of the dataset before it was written again")
    path.write_bytes(b"damaged")  # e.g. the disk filled up while it was written
    encoded = []
    original = diffusion_stage.LatentData.encode
    monkeypatch.setattr(diffusion_stage.LatentData, "encode",
                        classmethod(lambda cls, *args, **kwargs: encoded.append(1) or original(*args, **kwargs)))
    crops = diffusion_stage.load_latent_crops(data, "train", *_smoke_encoder(models, smoke_recipe), crop_latent_px=8,
                                              factor=4, nodule_share=0.5, cache=path)
    assert encoded == [1] and not stale.exists()  # encoded again, and the older encoding of the split dropped
    again = diffusion_stage.load_latent_crops(data, "train", *_smoke_encoder(models, smoke_recipe), crop_latent_px=8,
                                              factor=4, nodule_share=0.5, cache=path)
    assert encoded == [1] and torch.equal(again.data.latents, crops.data.latents)


def _smoke_encoder(models, recipe):
    from lsdm_aug.training.diffusion import load_autoencoder

    return load_autoencoder(models, recipe, torch.device("cpu"))


def test_classifiers_resume_and_draw_balanced_batches(copy_models, phantom_dataset, smoke_recipe, monkeypatch):
    models = copy_models()
    before = read(models / "classifier_malignancy.json")["steps"]
    state_before = read(models / "classifiers_state.json")["meta"]["history"]
    updates = count_ema_updates(monkeypatch)
    drawn = []
    original = NoduleCrops.balanced_index
    monkeypatch.setattr(NoduleCrops, "balanced_index",
                        lambda self, feature, count, generator: drawn.append((feature, count))
                        or original(self, feature, count, generator))
    train_classifiers(longer(smoke_recipe, "train_classifiers", 9), phantom_dataset, models, device="cpu",
                      progress=False)
    assert before == SMOKE_STEPS
    assert len(updates) == 3 * len(FEATURES)
    assert sorted(drawn) == sorted([(f, smoke_recipe.train_classifiers.batch_size) for f in FEATURES] * 3)
    meta = read(models / "classifiers_state.json")["meta"]
    assert meta["step"] == 9 and meta["ema_updates"] == 9
    assert_resumed(state_before, meta["history"])
    for feature in FEATURES:
        assert read(models / f"classifier_{feature}.json")["steps"] == 9


def test_a_finished_stage_is_not_trained_again(copy_models, phantom_dataset, smoke_recipe, monkeypatch):
    models = copy_models()
    weights = (models / "unet.safetensors").read_bytes()
    updates = count_ema_updates(monkeypatch)
    train_diffusion(smoke_recipe, phantom_dataset, models, device="cpu", progress=False)
    assert updates == []
    assert (models / "unet.safetensors").read_bytes() == weights


def test_diffusion_without_an_autoencoder_names_the_missing_file(phantom_dataset, smoke_recipe, tmp_path):
    from lsdm_aug.models.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="autoencoder"):
        train_diffusion(smoke_recipe, phantom_dataset, tmp_path / "empty", device="cpu", progress=False)
    assert not (tmp_path / "empty" / "unet.safetensors").exists()


def test_training_is_reproducible(phantom_dataset, smoke_recipe, smoke_models, tmp_path):
    """Same recipe, data and seed: the same autoencoder weights."""
    train_autoencoder(smoke_recipe, phantom_dataset, tmp_path / "again", device="cpu", progress=False)
    first, second = (build_autoencoder(smoke_recipe.autoencoder) for _ in range(2))
    load_weights(smoke_models / "autoencoder.safetensors", first)
    load_weights(tmp_path / "again" / "autoencoder.safetensors", second)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    assert read_config(tmp_path / "again" / "autoencoder.safetensors")["scale_factor"] == \
        read_config(smoke_models / "autoencoder.safetensors")["scale_factor"]
