"""The reverse-diffusion loop: reproducible, in-paints exactly, steps guidance into the noise as documented."""

from __future__ import annotations

import pytest
import torch

from lsdm_aug.config import load_recipe
from lsdm_aug.models.unet import SemanticCondition, semantic_onehot
from lsdm_aug.sampling.sampler import KnownRegion, sample_latents
from lsdm_aug.sampling.schedulers import build_scheduler

SHAPE = (1, 3, 8, 8)


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("phantom-smoke")


@pytest.fixture(scope="module")
def unet(perturbed_unet):
    return perturbed_unet(True)  # the smoke recipe's U-Net, feature-conditioned


@pytest.fixture(scope="module")
def condition():
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 8, (1, 1, 32, 32), generator=generator)
    return SemanticCondition(latent=torch.randn(SHAPE, generator=generator), onehot=semantic_onehot(labels))


def run(unet, recipe, condition, sampler="ddim", steps=4, seed=0, **kwargs):
    scheduler = build_scheduler(recipe.diffusion, sampler, steps)
    return sample_latents(unet, scheduler, condition, shape=SHAPE, generator=torch.Generator().manual_seed(seed),
                          **kwargs)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_same_seed_same_latent_other_seed_other_latent(unet, recipe, condition, sampler):
    first = run(unet, recipe, condition, sampler, seed=7)
    assert first.shape == SHAPE and torch.isfinite(first).all()
    assert torch.equal(first, run(unet, recipe, condition, sampler, seed=7))
    assert not torch.allclose(first, run(unet, recipe, condition, sampler, seed=8))


def test_ddpm_draws_its_step_noise_from_the_generator(unet, recipe, condition):
    """Same z_T, other generators: DDIM (eta 0) agrees, ancestral DDPM does not."""
    z_t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    results = {}
    for sampler in ("ddim", "ddpm"):
        scheduler = build_scheduler(recipe.diffusion, sampler, 4)
        results[sampler] = [sample_latents(unet, scheduler, condition, initial_noise=z_t,
                                           generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    assert torch.equal(*results["ddim"])
    assert not torch.allclose(*results["ddpm"])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_known_region_everywhere_returns_the_known_latent_exactly(unet, recipe, condition, sampler):
    known_latent = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)) * 3
    known = KnownRegion(latent=known_latent, mask=torch.ones(1, 1, 8, 8))
    assert torch.equal(run(unet, recipe, condition, sampler, known=known), known_latent)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_partial_known_region_is_exact_and_the_rest_is_generated(unet, recipe, condition, sampler):
    known_latent = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    mask = torch.ones(1, 1, 8, 8)
    mask[..., 2:6, 3:7] = 0
    result = run(unet, recipe, condition, sampler, known=KnownRegion(latent=known_latent, mask=mask))
    kept = mask.bool().expand(SHAPE)
    assert torch.equal(result[kept], known_latent[kept])
    assert not torch.allclose(result[~kept], known_latent[~kept])
    assert torch.isfinite(result).all()


def test_the_known_region_is_renoised_between_steps(unet, recipe, condition):
    """RePaint: at step i the U-Net sees the known part as sqrt(a_t) x + sqrt(1 - a_t) n, with n standard normal."""
    known_latent = 3 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))  # not noise-like itself
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1
    seen = []

    def record(latent, timesteps):
        seen.append((latent.clone(), int(timesteps[0])))
        return torch.zeros_like(latent)

    scheduler = build_scheduler(recipe.diffusion, "ddim", 5)
    sample_latents(unet, scheduler, condition, shape=SHAPE, generator=torch.Generator().manual_seed(0),
                   guidance=record, known=KnownRegion(latent=known_latent, mask=mask))
    assert len(seen) == 5
    for latent, timestep in seen[1:]:
        alpha_bar = scheduler.alphas_cumprod[timestep]
        implied_noise = ((latent - alpha_bar.sqrt() * known_latent) / (1 - alpha_bar).sqrt())[..., :4, :]
        assert 0.6 < float(implied_noise.std()) < 1.5, timestep
        assert abs(float(implied_noise.mean())) < 0.4, timestep


def test_on_step_is_called_once_per_step_and_guidance_sees_every_timestep(unet, recipe, condition):
    calls, timesteps_seen = [], []

    def guidance(latent, timesteps):
        timesteps_seen.append(timesteps.tolist())
        return torch.zeros_like(latent)

    steps = 6
    scheduler = build_scheduler(recipe.diffusion, "ddim", steps)
    guided = sample_latents(unet, scheduler, condition, shape=SHAPE, generator=torch.Generator().manual_seed(0),
                            guidance=guidance, on_step=lambda index, total: calls.append((index, total)))
    assert calls == [(i, steps) for i in range(1, steps + 1)]
    assert timesteps_seen == [[int(t)] for t in scheduler.timesteps]
    # a zero score is exactly no guidance
    assert torch.equal(guided, run(unet, recipe, condition, "ddim", steps=steps, seed=0))


def test_guidance_shifts_the_noise_by_sqrt_one_minus_alpha_bar(unet, recipe, condition):
    """One DDIM step to x0: a score s adds (1 - a_t) / sqrt(a_t) * s, and only where s is non-zero."""
    score = torch.zeros(SHAPE)
    score[..., 1:3, 2:5] = 0.01
    unguided = run(unet, recipe, condition, "ddim", steps=1)
    guided = run(unet, recipe, condition, "ddim", steps=1, guidance=lambda latent, t: score)
    alpha_bar = build_scheduler(recipe.diffusion, "ddim", 1).alphas_cumprod[999]
    assert torch.allclose(guided - unguided, (1 - alpha_bar) / alpha_bar.sqrt() * score, rtol=1e-3, atol=1e-4)
    assert torch.equal(guided[score == 0], unguided[score == 0])


def test_shape_or_noise_is_required(unet, recipe, condition):
    with pytest.raises(ValueError, match="shape"):
        sample_latents(unet, build_scheduler(recipe.diffusion, "ddim", 2), condition)
