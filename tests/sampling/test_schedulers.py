"""Schedulers: linear betas over 1000 training steps, N sampling steps give N timesteps, no clipping."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from lsdm_aug.config import DiffusionConfig, load_recipe
from lsdm_aug.sampling.schedulers import build_scheduler, training_scheduler

CONFIG = DiffusionConfig()


@pytest.mark.parametrize(("sampler", "kind"), [("ddim", DDIMScheduler), ("ddpm", DDPMScheduler)])
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_n_steps_give_n_decreasing_timesteps(sampler, kind, steps):
    scheduler = build_scheduler(CONFIG, sampler, steps)
    assert isinstance(scheduler, kind)
    timesteps = [int(t) for t in scheduler.timesteps]
    assert len(timesteps) == steps
    assert timesteps == sorted(set(timesteps), reverse=True)
    assert 0 <= timesteps[-1] and timesteps[0] <= 999


def test_default_steps_are_all_training_steps():
    assert len(build_scheduler(CONFIG, "ddim").timesteps) == 1000


@pytest.mark.parametrize("name", ["phantom-smoke", "phantom-128", "lidc-512"])
def test_linear_beta_schedule_over_1000_training_steps(name):
    config = load_recipe(name).diffusion
    for scheduler in (training_scheduler(config), build_scheduler(config, "ddpm", 10), build_scheduler(config, "ddim", 10)):
        assert scheduler.num_train_timesteps == 1000
        assert torch.allclose(scheduler.betas, torch.linspace(0.0015, 0.0195, 1000))
        assert torch.allclose(scheduler.alphas_cumprod, torch.cumprod(1 - scheduler.betas, 0))


def test_samples_are_not_clipped():
    """Latents are unit-variance, not [-1, 1] images: a predicted x0 of 3 stays 3."""
    scheduler = build_scheduler(CONFIG, "ddim", 10)
    assert scheduler.clip_sample is False and training_scheduler(CONFIG).clip_sample is False
    timestep = int(scheduler.timesteps[-1])
    sample = torch.full((1, 1, 2, 2), 3.0)
    _, predicted_x0 = scheduler.step(torch.zeros_like(sample), timestep, sample)
    assert predicted_x0.max() > 2.5


def test_unknown_sampler_is_named():
    with pytest.raises(ValueError, match="'euler'") as error:
        build_scheduler(CONFIG, "euler", 10)
    assert "ddpm" in str(error.value) and "ddim" in str(error.value)


@pytest.mark.parametrize("steps", [0, -1, 1001, 5000])
def test_steps_out_of_range_are_named(steps):
    with pytest.raises(ValueError, match=rf"1\.\.1000, got {steps}\b"):
        build_scheduler(CONFIG, "ddim", steps)
