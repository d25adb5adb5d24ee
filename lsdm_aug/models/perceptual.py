"""A perceptual distance from local weights only: a MONAI ResNet's feature maps, LPIPS-style.

Nothing is downloaded. The user gives a weight file of a 2D ResNet (18, 34 or 50; torchvision /
RadImageNet key names, e.g. ``conv1.weight``, ``layer1.0.conv1.weight``; the ``fc`` head is ignored)
as ``.safetensors`` (read without pickle) or a ``.pt``/``.pth`` state dict (read with
``torch.load(weights_only=True)``). The distance is the mean over ``layer1``..``layer4`` of the
squared difference of channel-normalised features. Used as the autoencoder's optional perceptual
term and as the pluggable perceptual metric of the benchmarks.

Example:
    >>> distance = PerceptualDistance("radimagenet_resnet50.safetensors", depth=50)  # doctest: +SKIP
    >>> distance(images, reconstructions).shape  # doctest: +SKIP
    torch.Size([8])
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import resnet18, resnet34, resnet50
from safetensors.torch import load_file

from lsdm_aug.models.checkpoint import CheckpointError

__all__ = ["PerceptualDistance", "load_feature_weights"]

_DEPTHS = {18: resnet18, 34: resnet34, 50: resnet50}
_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def load_feature_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a weights-only ``.pt``/``.pth`` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"perceptual weights {str(path)!r} are missing (nothing is downloaded; give a local file)")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"perceptual weights {str(path)!r} cannot be read: {error}") from error


class PerceptualDistance(torch.nn.Module):
    """Per-sample perceptual distance between two batches of single-channel images in [-1, 1].

    Args:
        weights_path: local ResNet weights (see the module docstring).
        depth: 18, 34 or 50.

    Example:
        >>> distance = PerceptualDistance("resnet18.safetensors", depth=18)  # doctest: +SKIP
        >>> distance(images, others).shape, distance.embed(images).shape  # doctest: +SKIP
        (torch.Size([8]), torch.Size([8, 512]))
    """

    def __init__(self, weights_path: str | Path, depth: int = 50) -> None:
        super().__init__()
        if depth not in _DEPTHS:
            raise ValueError(f"depth must be one of {sorted(_DEPTHS)}, got {depth!r}")
        self.network = _DEPTHS[depth](spatial_dims=2, n_input_channels=3, num_classes=1000)
        state = {k: v for k, v in load_feature_weights(weights_path).items() if not k.startswith("fc.")}
        missing, unexpected = self.network.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise CheckpointError(f"perceptual weights {str(weights_path)!r} do not fit a ResNet{depth}: "
                                  f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.network.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def _stages(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each ResNet stage's activations, images in [-1, 1] mapped to ImageNet-normalised RGB."""
        x = ((images.clamp(-1, 1) + 1) / 2).repeat(1, 3, 1, 1)
        net = self.network
        x = net.maxpool(net.act(net.bn1(net.conv1((x - self.mean) / self.std))))
        out = []
        for name in _LAYERS:
            x = getattr(net, name)(x)
            out.append(x)
        return out

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Channel-normalised stage activations (the LPIPS-style features)."""
        return [F.normalize(x, dim=1) for x in self._stages(images)]

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Pooled last-stage features (B, 512 for ResNet18/34, 2048 for ResNet50): FID features, as Inception's
        pool features are."""
        return torch.cat([self._stages(images[i:i + batch_size])[-1].mean(dim=(-2, -1))
                          for i in range(0, len(images), batch_size)])

    @torch.no_grad()
    def distance(self, images: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """``forward`` without gradients (the metric interface shared with the in-project slice features)."""
        return self(images, others)

    def forward(self, images: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        return sum((a - b).pow(2).mean(dim=(1, 2, 3)) for a, b in zip(self.features(images), self.features(others))) / len(_LAYERS)
