"""Feature classifiers on decoded noisy nodule crops: MONAI ``DiffusionModelEncoder`` (the U-Net's encoder + head).

Each network takes ``Crop(Decoder(z_t))`` (1 x crop x crop, in [-1, 1]-like units) and the timestep:

* malignancy: 2 logits, benign (rating <= 2) vs malignant (>= 3), trained with cross-entropy;
* lobulation, spiculation, texture: one value regressing the 1..5 rating, trained with MSE.

Example:
    >>> import torch
    >>> from lsdm_aug.config import ClassifierConfig
    >>> net = build_classifier(ClassifierConfig(channels=(8, 16, 16), crop_px=16), "malignancy")
    >>> net(torch.zeros(2, 1, 16, 16), torch.tensor([0, 500])).shape
    torch.Size([2, 2])
"""

from __future__ import annotations

from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder

from lsdm_aug.config import FEATURES, ClassifierConfig

__all__ = ["build_classifier", "output_channels", "classifier_file"]


def classifier_file(feature: str) -> str:
    """The weights file of ``feature``'s classifier in a model folder, e.g. ``classifier_texture.safetensors``."""
    return f"classifier_{feature}.safetensors"


def output_channels(feature: str) -> int:
    """2 logits for malignancy, 1 regression output otherwise."""
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    return 2 if feature == "malignancy" else 1


def build_classifier(config: ClassifierConfig, feature: str) -> DiffusionModelEncoder:
    """The time-conditioned classifier of one feature, for ``config.crop_px`` square crops."""
    config.validate()
    levels = len(config.channels)
    return DiffusionModelEncoder(
        spatial_dims=2, in_channels=1, out_channels=output_channels(feature), input_shape=(config.crop_px,) * 2,
        channels=tuple(config.channels), attention_levels=(False,) * levels,
        num_res_blocks=(config.num_res_blocks,) * levels, norm_num_groups=config.norm_num_groups)
