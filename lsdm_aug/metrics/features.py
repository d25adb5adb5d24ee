"""Image features for FID and perceptual distance without downloaded weights: a CT slice network trained here.

No Inception or LPIPS weights can be fetched, so the default feature extractor is a small MONAI
ResNet (four basic blocks, 16..128 channels) trained inside the project on prepared CT slices to
predict each slice's semantic make-up: the area share of each of the 8 semantic labels (background,
body, soft tissue, high-dense tissue, lung, three nodule classes) and whether a nodule is present.
Its pooled last-layer activations (128 values) are the FID features; its four layers, channel-
normalised, give an LPIPS-style perceptual distance. Its weights are a safetensors file with a JSON
config, like every model here. A user with local Inception-like or RadImageNet weights plugs them in
through :class:`~lsdm_aug.models.perceptual.PerceptualDistance` instead.

Example:
    >>> path = train_slice_features("prepared/phantom-128", "models/features/slice_features.safetensors")  # doctest: +SKIP
    >>> extractor = SliceFeatures.from_file(path)  # doctest: +SKIP
    >>> fid = frechet_distance(extractor.embed(real), extractor.embed(generated))  # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.metrics import FIDMetric
from monai.networks.nets import ResNet

from lsdm_aug.data.semantic import NUM_LABELS
from lsdm_aug.models.checkpoint import load_weights, save_weights
from lsdm_aug.progress import make_progress
from lsdm_aug.training.common import load_split_arrays

__all__ = ["SliceFeatures", "train_slice_features", "frechet_distance", "slice_targets"]

WIDTHS = (16, 32, 64, 128)
_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def slice_targets(semantic_maps: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) label maps -> (B, 9): the area share of each label and nodule presence (0/1)."""
    labels = semantic_maps.long().reshape(len(semantic_maps), -1)
    shares = F.one_hot(labels, NUM_LABELS).float().mean(dim=1)
    return torch.cat([shares, (labels >= 5).any(dim=1, keepdim=True).float()], dim=1)


class SliceFeatures(torch.nn.Module):
    """The slice network: ``embed`` for FID features, ``distance`` for the perceptual distance.

    Args:
        widths: channels of the four ResNet stages.

    Example:
        >>> net = SliceFeatures()
        >>> net.embed(torch.zeros(2, 1, 64, 64)).shape
        torch.Size([2, 128])
    """

    def __init__(self, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        self.widths = tuple(widths)
        self.network = ResNet(block="basic", layers=(1, 1, 1, 1), block_inplanes=list(widths), spatial_dims=2,
                              n_input_channels=1, num_classes=NUM_LABELS + 1)

    def layers(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's activations for images (B, 1, H, W) in [-1, 1]."""
        net = self.network
        x = net.maxpool(net.act(net.bn1(net.conv1(images.clamp(-1, 1)))))
        out = []
        for name in _LAYERS:
            x = getattr(net, name)(x)
            out.append(x)
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted semantic make-up (B, 9): shares through a softmax, presence as a logit."""
        return self.network(images.clamp(-1, 1))

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Pooled last-stage features (B, widths[-1]), the FID features."""
        return torch.cat([self.layers(images[i:i + batch_size])[-1].mean(dim=(-2, -1))
                          for i in range(0, len(images), batch_size)])

    @torch.no_grad()
    def distance(self, images: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """Per-sample perceptual distance: mean over stages of the squared difference of channel-normalised maps."""
        pairs = zip(self.layers(images), self.layers(others))
        return torch.stack([(F.normalize(a, dim=1) - F.normalize(b, dim=1)).pow(2).sum(1).mean(dim=(-2, -1))
                            for a, b in pairs]).mean(0)

    @classmethod
    def from_file(cls, path: str | Path) -> SliceFeatures:
        """Load weights written by :func:`train_slice_features` (safetensors + JSON; never unpickled)."""
        from lsdm_aug.models.checkpoint import read_config

        network = cls(tuple(read_config(path).get("widths", WIDTHS)))
        load_weights(path, network)
        return network.eval().requires_grad_(False)


def _loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    shares = F.kl_div(F.log_softmax(prediction[:, :NUM_LABELS], 1), target[:, :NUM_LABELS], reduction="batchmean")
    return shares + F.binary_cross_entropy_with_logits(prediction[:, NUM_LABELS], target[:, NUM_LABELS])


def _split(data_dir: str | Path, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    arrays = load_split_arrays(data_dir, split, limit=limit)
    images = torch.from_numpy(arrays["image"]).float().unsqueeze(1)
    return images, slice_targets(torch.from_numpy(arrays["semantic_map"]).unsqueeze(1))


def train_slice_features(data_dir: str | Path, out_path: str | Path, steps: int = 1500, batch_size: int = 32,
                         learning_rate: float = 1e-3, seed: int = 0, progress: bool = False) -> Path:
    """Train the slice network on the ``train`` split of a prepared dataset; writes ``out_path`` (+ ``.json``).

    Returns ``out_path``. The config records the data, steps, wall time and the validation loss.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch size must be >= 1, got {steps} and {batch_size}")
    torch.manual_seed(seed)
    images, targets = _split(data_dir, "train")
    validation_images, validation_targets = _split(data_dir, "validation", limit=256)
    network = SliceFeatures()
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate)
    generator, started = torch.Generator().manual_seed(seed), time.perf_counter()
    with make_progress() as bar:
        task = bar.add_task("slice features", total=steps, rate="", visible=progress)
        for _ in range(steps):
            index = torch.randint(len(images), (batch_size,), generator=generator)
            batch = images[index]
            if torch.rand(1, generator=generator).item() < 0.5:
                batch = batch.flip(-1)  # left-right: the make-up does not change
            loss = _loss(network(batch), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(task, advance=1, rate=f"loss {loss.item():.4f}")
    network.eval()
    with torch.no_grad():
        validation_loss = float(_loss(network(validation_images), validation_targets))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(out_path, network, {"component": "slice_features", "widths": list(network.widths),
                                     "data": str(data_dir), "steps": steps, "batch_size": batch_size,
                                     "seconds": round(time.perf_counter() - started, 1),
                                     "validation_loss": validation_loss})
    return out_path


def frechet_distance(real: torch.Tensor, generated: torch.Tensor) -> float:
    """Fréchet distance of two feature sets (N, D) (MONAI's ``FIDMetric``)."""
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"features must be (N, D) with one D, got {tuple(real.shape)} and {tuple(generated.shape)}")
    if min(len(real), len(generated)) < 2:
        raise ValueError(f"the Fréchet distance needs >= 2 samples per set, got {len(real)} and {len(generated)}")
    return float(FIDMetric()(generated.double(), real.double()))
