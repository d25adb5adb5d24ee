"""The latent semantic diffusion U-Net: MONAI ``SPADEDiffusionModelUNet`` with LSDM's conditioning.

* input: the noisy latent concatenated with the encoded semantic map (the map scaled to [-1, 1] and
  passed through the autoencoder's encoder), so ``in_channels = 2 * latent_channels``;
* SPADE: the one-hot 8-class map, **max-pooled** to each block's resolution (MONAI resizes with
  nearest neighbour, which drops a nodule smaller than the pooling window; max-pooling keeps it, as
  the thesis prescribes). :class:`MaxPoolSPADE` is swapped in for MONAI's ``SPADE`` after the net is
  built; it adds no parameters, so checkpoints stay MONAI-compatible.

Example:
    >>> import torch
    >>> from lsdm_aug.config import DiffusionConfig
    >>> unet = build_unet(DiffusionConfig(channels=(16, 16, 32), attention_levels=(False, False, False),
    ...                                   norm_num_groups=8, spade_intermediate_channels=8), latent_channels=3)
    >>> semantic = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    >>> condition = SemanticCondition(latent=torch.zeros(1, 3, 8, 8), onehot=semantic_onehot(semantic))
    >>> predict_noise(unet, torch.zeros(1, 3, 8, 8), torch.tensor([10]), condition).shape
    torch.Size([1, 3, 8, 8])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks.spade_norm import SPADE
from monai.networks.nets import DiffusionModelUNet, SPADEDiffusionModelUNet

from lsdm_aug.config import DiffusionConfig
from lsdm_aug.data.semantic import NUM_LABELS

__all__ = ["MaxPoolSPADE", "build_unet", "semantic_onehot", "semantic_to_unit", "SemanticCondition", "predict_noise"]


class MaxPoolSPADE(SPADE):
    """MONAI's SPADE, with the semantic map max-pooled (not nearest-resized) to the features' size."""

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        if segmap.shape[2:] != size and all(s >= t for s, t in zip(segmap.shape[2:], size)):
            segmap = F.adaptive_max_pool2d(segmap, size) if segmap.ndim == 4 else F.adaptive_max_pool3d(segmap, size)
        return super().forward(x, segmap)


def build_unet(config: DiffusionConfig, latent_channels: int) -> SPADEDiffusionModelUNet | DiffusionModelUNet:
    """The SPADE diffusion U-Net of LSDM (noisy latent + encoded map in, noise out); with ``config.spade``
    false, the LDM baseline's plain U-Net (the map only concatenated)."""
    config.validate()
    levels = len(config.channels)
    if not config.spade:
        return DiffusionModelUNet(
            spatial_dims=2, in_channels=2 * latent_channels, out_channels=latent_channels,
            channels=tuple(config.channels), attention_levels=tuple(config.attention_levels),
            num_res_blocks=(config.num_res_blocks,) * levels, norm_num_groups=config.norm_num_groups,
            num_head_channels=config.num_head_channels)
    unet = SPADEDiffusionModelUNet(
        spatial_dims=2, in_channels=2 * latent_channels, out_channels=latent_channels, label_nc=NUM_LABELS,
        channels=tuple(config.channels), attention_levels=tuple(config.attention_levels),
        num_res_blocks=(config.num_res_blocks,) * levels, norm_num_groups=config.norm_num_groups,
        num_head_channels=config.num_head_channels, spade_intermediate_channels=config.spade_intermediate_channels)
    for module in unet.modules():
        if type(module) is SPADE:
            module.__class__ = MaxPoolSPADE
    return unet


def semantic_onehot(semantic_map: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) or (B, H, W) integer labels 0..7 -> (B, 8, H, W) float one-hot."""
    labels = semantic_map.long()
    if labels.ndim == 4:
        labels = labels[:, 0]
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_LABELS):
        raise ValueError(f"semantic labels must be in 0..{NUM_LABELS - 1}, got {int(labels.min())}..{int(labels.max())}")
    return F.one_hot(labels, NUM_LABELS).permute(0, 3, 1, 2).float()


def semantic_to_unit(semantic_map: torch.Tensor) -> torch.Tensor:
    """Labels 0..7 scaled to [-1, 1], (B, 1, H, W) float: the image-like map the autoencoder encodes."""
    labels = semantic_map.float()
    if labels.ndim == 3:
        labels = labels[:, None]
    return labels / (NUM_LABELS - 1) * 2.0 - 1.0


@dataclass
class SemanticCondition:
    """What the U-Net is conditioned on: the encoded map (concatenated) and the one-hot map (SPADE)."""

    latent: torch.Tensor
    onehot: torch.Tensor

    def crop(self, rows: slice, cols: slice, factor: int) -> SemanticCondition:
        """The condition of a latent window (``rows``, ``cols`` in latent pixels; ``factor`` = downsampling)."""
        image_rows = slice(rows.start * factor, rows.stop * factor)
        image_cols = slice(cols.start * factor, cols.stop * factor)
        return SemanticCondition(self.latent[..., rows, cols], self.onehot[..., image_rows, image_cols])

    def repeat(self, times: int) -> SemanticCondition:
        return SemanticCondition(self.latent.repeat(times, 1, 1, 1), self.onehot.repeat(times, 1, 1, 1))


def predict_noise(unet: torch.nn.Module, noisy_latent: torch.Tensor, timesteps: torch.Tensor,
                  condition: SemanticCondition) -> torch.Tensor:
    """epsilon_theta(Concat(z_t, E(m)), t) with SPADE fed the one-hot map (the LDM baseline: no SPADE)."""
    inputs = torch.cat([noisy_latent, condition.latent], dim=1)
    if isinstance(unet, DiffusionModelUNet) or isinstance(getattr(unet, "module", None), DiffusionModelUNet):
        return unet(inputs, timesteps)
    return unet(inputs, timesteps, seg=condition.onehot)
