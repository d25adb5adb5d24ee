"""The KL autoencoder: f = 4 downsampling to 3 latent channels, and its latent scale factor."""

from __future__ import annotations

import math

import torch

from lsdm_aug.config import AutoencoderConfig
from lsdm_aug.models.autoencoder import build_autoencoder, encode_mean, latent_scale_factor


def tiny_autoencoder(channels=(8, 16, 16)):
    torch.manual_seed(0)
    return build_autoencoder(AutoencoderConfig(channels=channels, norm_num_groups=8)).eval()


def test_latent_is_a_quarter_of_the_image_with_3_channels():
    autoencoder = tiny_autoencoder()
    images = torch.rand(2, 1, 64, 48) * 2 - 1
    with torch.no_grad():
        latent = autoencoder.encode_stage_2_inputs(images)
        assert latent.shape == (2, 3, 16, 12)
        assert encode_mean(autoencoder, images).shape == (2, 3, 16, 12)
        assert autoencoder.decode_stage_2_outputs(latent).shape == images.shape


def test_encode_mean_is_deterministic_while_sampling_is_not():
    autoencoder = tiny_autoencoder()
    images = torch.rand(1, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(encode_mean(autoencoder, images), encode_mean(autoencoder, images))
        _, z_mu, _ = autoencoder(images)
        assert torch.equal(z_mu, encode_mean(autoencoder, images))


def test_scale_factor_gives_unit_standard_deviation():
    autoencoder = tiny_autoencoder()
    images = torch.rand(8, 1, 32, 32) * 2 - 1
    scale = latent_scale_factor(autoencoder, images)
    assert math.isfinite(scale) and scale > 0
    with torch.no_grad():
        scaled = encode_mean(autoencoder, images) * scale
    assert abs(float(scaled.flatten().std()) - 1.0) < 1e-4
