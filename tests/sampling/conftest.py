"""Shared by the sampler tests: small U-Nets moved off MONAI's zero-initialised output."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lsdm_aug.config import load_recipe
from lsdm_aug.models.unet import build_unet


@pytest.fixture(scope="session")
def perturbed_unet() -> Callable[[bool], torch.nn.Module]:
    """``perturbed_unet(feature_conditioning)``: the smoke recipe's U-Net with weights nudged (seed 0), so it
    predicts non-trivial noise (and, feature-conditioned, noise that depends on the features)."""

    def build(feature_conditioning: bool) -> torch.nn.Module:
        recipe = load_recipe("phantom-smoke")
        recipe.diffusion.feature_conditioning = feature_conditioning
        torch.manual_seed(0)
        unet = build_unet(recipe.diffusion, recipe.autoencoder.latent_channels).eval()
        with torch.no_grad():
            for parameter in unet.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        return unet

    return build
