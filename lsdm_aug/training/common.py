"""What every training stage shares: device and torchrun/DDP set-up, data in memory, EMA, resumable state.

Example:
    >>> context = DistributedContext.from_environment()
    >>> context.world_size
    1
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lsdm_aug.data.prepared import PreparedDataset
from lsdm_aug.models.checkpoint import load_matching_weights, resolve_model_dir

__all__ = ["DistributedContext", "select_device", "EMA", "load_split_arrays", "random_crops", "initialise_from",
           "training_spacing"]


def select_device(device: str | None = None) -> torch.device:
    """``device`` if given (e.g. ``"cpu"``, ``"cuda:1"``), else CUDA when present, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class DistributedContext:
    """Rank and world size under ``torchrun`` (gloo on CPU, NCCL on CUDA); a single process otherwise."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_environment(cls, device: str | None = None) -> DistributedContext:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        chosen = select_device(device)
        if world_size > 1 and not dist.is_initialized():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if chosen.type == "cuda":
                chosen = torch.device("cuda", local_rank)
                torch.cuda.set_device(chosen)
            dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
        rank = dist.get_rank() if dist.is_initialized() else 0
        return cls(rank=rank, world_size=world_size, device=chosen)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel around ``module`` when there are several processes."""
        module = module.to(self.device)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return module

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


class EMA:
    """Exponential moving average of a model's weights, with the decay warm-up of diffusers' ``EMAModel``.

    The decay used at step ``n`` is ``min(decay, (1 + n) / (10 + n))``: with a few thousand CPU steps a
    fixed 0.9999 would average mostly the initial weights.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> ema = EMA(model, decay=0.9999)
        >>> ema.update(model)
        >>> ema.model is not model
        True
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay!r}")
        self.decay = decay
        self.model = copy.deepcopy(getattr(model, "module", model)).eval().requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.current_decay()
        source = getattr(model, "module", model)
        for averaged, current in zip(self.model.parameters(), source.parameters()):
            averaged.lerp_(current.detach(), 1.0 - decay)
        for averaged, current in zip(self.model.buffers(), source.buffers()):
            averaged.copy_(current)
        self.updates += 1


def load_split_arrays(data_dir: str | Path, split: str, keys: tuple[str, ...] = ("image", "semantic_map"),
                      limit: int | None = None) -> dict[str, np.ndarray]:
    """Stack the arrays of one split of a prepared dataset (1280 slices of 512 px: 1.3 GB of images)."""
    dataset = PreparedDataset(data_dir, split=split)
    if len(dataset) == 0:
        raise ValueError(f"prepared dataset {str(data_dir)!r} has no cases in split {split!r}")
    count = min(len(dataset), limit or len(dataset))
    first = dataset[0]
    arrays = {key: np.empty((count, *np.shape(first[key])), np.asarray(first[key]).dtype) for key in keys}
    for i in range(count):  # filled in place: at 512 px a list of cases and its stack would hold it all twice
        item = first if i == 0 else dataset[i]
        for key in keys:
            arrays[key][i] = item[key]
    return arrays


def random_crops(images: torch.Tensor, crop_px: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` random ``crop_px`` crops from (N, C, H, W) ``images`` (whole slices if crop_px >= H)."""
    n, _, height, width = images.shape
    index = torch.randint(n, (batch_size,), generator=generator)
    if crop_px >= min(height, width):
        return images[index]
    rows = torch.randint(height - crop_px + 1, (batch_size,), generator=generator)
    cols = torch.randint(width - crop_px + 1, (batch_size,), generator=generator)
    return torch.stack([images[i, :, r:r + crop_px, c:c + crop_px] for i, r, c in zip(index, rows, cols)])


def initialise_from(module: torch.nn.Module, source: str, file_name: str) -> list[str]:
    """Warm start ``module`` from the weights file ``file_name`` of a model folder (or a shipped model's name).
    Returns the keys left at their initial values."""
    return load_matching_weights(resolve_model_dir(source) / file_name, module)


def training_spacing(data_dir: str | Path, split: str = "train") -> dict[str, float]:
    """The pixel spacing a model trains at: median, 5th and 95th percentile, min and max over the split's slices.

    Example:
        >>> training_spacing("prepared/phantom-512")  # doctest: +SKIP
        {'median': 0.703, 'p05': 0.5625, 'p95': 0.8301, 'min': 0.4609, 'max': 0.9766}
    """
    spacing = PreparedDataset(data_dir, split=split).cases.spacing_mm.to_numpy(np.float64)
    if not len(spacing):
        raise ValueError(f"prepared dataset {str(data_dir)!r} has no cases in split {split!r}")
    return {"median": round(float(np.median(spacing)), 4), "p05": round(float(np.percentile(spacing, 5)), 4),
            "p95": round(float(np.percentile(spacing, 95)), 4), "min": round(float(spacing.min()), 4),
            "max": round(float(spacing.max()), 4)}
