"""The KL autoencoder (MONAI ``AutoencoderKL``) and its patch discriminator.

Images are single-channel CT slices in [-1, 1]; latents have ``latent_channels`` channels at
1/``downsampling`` of the image size (LSDM: f = 4, 3 channels). Latents are multiplied by a scale
factor, computed from the training latents and saved with the weights, so the diffusion model sees
unit-variance inputs.

Example:
    >>> import torch
    >>> from lsdm_aug.config import AutoencoderConfig
    >>> autoencoder = build_autoencoder(AutoencoderConfig(channels=(16, 16, 16), norm_num_groups=8))
    >>> autoencoder.encode_stage_2_inputs(torch.zeros(1, 1, 32, 32)).shape
    torch.Size([1, 3, 8, 8])
"""

from __future__ import annotations

import torch
from monai.networks.nets import AutoencoderKL, PatchDiscriminator

from lsdm_aug.config import AutoencoderConfig

__all__ = ["build_autoencoder", "build_discriminator", "encode_mean", "latent_scale_factor"]


def build_autoencoder(config: AutoencoderConfig) -> AutoencoderKL:
    """MONAI ``AutoencoderKL`` for 2D single-channel slices."""
    config.validate()
    levels = len(config.channels)
    return AutoencoderKL(
        spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(config.channels),
        num_res_blocks=(config.num_res_blocks,) * levels, latent_channels=config.latent_channels,
        attention_levels=(False,) * levels, norm_num_groups=config.norm_num_groups,
        with_encoder_nonlocal_attn=config.attention, with_decoder_nonlocal_attn=config.attention)


def build_discriminator(channels: int = 32, num_layers: int = 3) -> PatchDiscriminator:
    """MONAI ``PatchDiscriminator`` for the patch-adversarial term."""
    return PatchDiscriminator(spatial_dims=2, num_layers_d=num_layers, channels=channels, in_channels=1,
                              out_channels=1, norm="INSTANCE")


def encode_mean(autoencoder: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """The posterior mean of the latent (deterministic encoding, as used for diffusion targets)."""
    z_mu, _ = autoencoder.encode(images)
    return z_mu


@torch.no_grad()
def latent_scale_factor(autoencoder: AutoencoderKL, images: torch.Tensor) -> float:
    """1 / std of the training latents, as in latent diffusion (encoded a few slices at a time)."""
    chunk = max(1, 16 * 128 * 128 // int(images.shape[-2] * images.shape[-1]))
    latents = torch.cat([encode_mean(autoencoder, images[i:i + chunk]).flatten() for i in range(0, len(images), chunk)])
    return float(1.0 / latents.std().clamp_min(1e-6))
