"""Classifier-free guidance inside the one sampler loop: exact at w = 0 and w = 1, batched otherwise."""

from __future__ import annotations

import pytest
import torch

from lsdm_aug.config import load_recipe
from lsdm_aug.models.unet import SemanticCondition, feature_levels, predict_noise, semantic_onehot
from lsdm_aug.sampling.sampler import guided_noise, sample_latents
from lsdm_aug.sampling.schedulers import build_scheduler

SHAPE = (2, 3, 8, 8)


@pytest.fixture(scope="module")
def unet(perturbed_unet):
    return perturbed_unet(True)


@pytest.fixture(scope="module")
def condition():
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 8, (2, 1, 32, 32), generator=generator)
    names = load_recipe("phantom-smoke").diffusion.conditioned_features  # the smoke U-Net's features
    levels = torch.cat([feature_levels({"malignancy": 5, "texture": 1}, names=names),
                        feature_levels({"malignancy": 1}, names=names)])
    return SemanticCondition(torch.randn(SHAPE, generator=generator), semantic_onehot(labels), levels)


def _inputs():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)), torch.tensor([300, 700])


def test_w1_is_the_conditional_and_w0_the_null_prediction_exactly(unet, condition):
    latent, t = _inputs()
    assert torch.equal(guided_noise(unet, latent, t, condition, 1.0), predict_noise(unet, latent, t, condition))
    null = predict_noise(unet, latent, t, condition.with_features(None))
    assert torch.equal(guided_noise(unet, latent, t, condition, 0.0), null)
    assert not torch.allclose(null, predict_noise(unet, latent, t, condition))


@pytest.mark.parametrize("w", [0.5, 2.0, 4.0])
def test_the_batched_passes_combine_as_null_plus_w_times_the_difference(unet, condition, w):
    latent, t = _inputs()
    conditional = predict_noise(unet, latent, t, condition)
    null = predict_noise(unet, latent, t, condition.with_features(None))
    expected = null + w * (conditional - null)
    assert torch.allclose(guided_noise(unet, latent, t, condition, w), expected, atol=1e-5)


def test_without_given_features_every_scale_is_the_plain_prediction(unet, condition):
    latent, t = _inputs()
    nothing = condition.with_features(torch.zeros_like(condition.features))
    plain = predict_noise(unet, latent, t, nothing)
    for w in (0.0, 1.0, 3.0):
        assert torch.equal(guided_noise(unet, latent, t, nothing, w), plain)


def test_a_unet_without_features_ignores_the_scale(condition, perturbed_unet):
    plain_unet = perturbed_unet(False)
    latent, t = _inputs()
    assert torch.equal(guided_noise(plain_unet, latent, t, condition, 3.0), predict_noise(plain_unet, latent, t, condition))


def test_a_negative_scale_is_refused(unet, condition):
    latent, t = _inputs()
    with pytest.raises(ValueError, match="cfg_scale must be >= 0, got -1"):
        guided_noise(unet, latent, t, condition, -1.0)


def test_the_sampler_loop_uses_the_scale(unet, condition):
    recipe = load_recipe("phantom-smoke")
    runs = {}
    for w in (0.0, 1.0, 3.0):
        scheduler = build_scheduler(recipe.diffusion, "ddim", 4)
        runs[w] = sample_latents(unet, scheduler, condition, shape=SHAPE, cfg_scale=w,
                                 generator=torch.Generator().manual_seed(0))
    null_run = sample_latents(unet, build_scheduler(recipe.diffusion, "ddim", 4), condition.with_features(None),
                              shape=SHAPE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(runs[0.0], null_run)
    assert not torch.allclose(runs[1.0], runs[3.0])
