"""Stage 2: the latent semantic diffusion U-Net (LSDM thesis, Algorithm 1).

The frozen autoencoder encodes every training slice and its semantic map (scaled to [-1, 1]) once;
each step draws t uniformly, noises the latent with the linear-beta forward process, and regresses
the noise from ``Concat(z_t, E(m))`` with SPADE fed the one-hot map. An EMA of the weights is what
gets saved. Resumable; DDP under ``torchrun``.

At native resolution the U-Net trains on windows of the whole-slice latents (``train_diffusion.crop_px``
image pixels, e.g. 128 px = 32 x 32 latents), a share of them (``nodule_share``) placed around a
nodule, so the CPU cost per step is that of a 128 px slice. A feature-conditioned U-Net
(``diffusion.feature_conditioning``) also gets the feature levels of the nodule the window shows (the
largest inside; none: "not given"), dropped for classifier-free guidance: all four together with
probability ``feature_dropout_all``, otherwise each alone with probability ``feature_dropout``, so
that any subset of features can be asked and the null condition is learned on nodules too. The noise
error on the nodules' footprint can weigh more than the rest (``nodule_loss_weight``,
:func:`nodule_weighted_mse`).

Example:
    >>> train_diffusion(load_recipe("phantom-smoke"), "prepared/phantom-64", "models/smoke")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lsdm_aug.config import FEATURES, Recipe
from lsdm_aug.models.autoencoder import build_autoencoder, encode_mean
from lsdm_aug.models.checkpoint import (CheckpointError, config_path, load_tensors, load_training_state, load_weights,
                                       read_config, save_tensors, save_training_state, save_weights)
from lsdm_aug.data.prepared import PreparedDataset
from lsdm_aug.data.semantic import SemanticLabel
from lsdm_aug.models.unet import (SemanticCondition, build_unet, feature_levels,
                                  is_feature_conditioned, predict_noise, semantic_onehot, semantic_to_unit)
from lsdm_aug.progress import make_progress
from lsdm_aug.sampling.schedulers import training_scheduler
from lsdm_aug.training.autoencoder import AUTOENCODER_FILE
from lsdm_aug.training.common import EMA, DistributedContext, initialise_from, load_split_arrays, training_spacing

__all__ = ["train_diffusion", "LatentData", "LatentCrops", "load_autoencoder", "UNET_FILE", "drop_features",
           "nodule_weighted_mse"]

UNET_FILE = "unet.safetensors"
STATE_FILE = "unet_state.safetensors"
LATENT_CACHE_DIR = "latent_cache"  # in the model folder: encoded splits, so a resumed or repeated run skips encoding


def load_autoencoder(model_dir: str | Path, recipe: Recipe, device: torch.device) -> tuple[torch.nn.Module, float]:
    """The trained autoencoder of ``model_dir``, frozen, and its latent scale factor."""
    autoencoder = build_autoencoder(recipe.autoencoder)
    config = load_weights(Path(model_dir) / AUTOENCODER_FILE, autoencoder)
    return autoencoder.to(device).eval().requires_grad_(False), float(config["scale_factor"])


class LatentData:
    """A split's image latents, encoded semantic maps and the maps themselves, held in memory.

    Example:
        >>> data = LatentData.encode(arrays, autoencoder, scale=1.0)  # doctest: +SKIP
        >>> batch_latent, condition = data.batch(torch.arange(4))  # doctest: +SKIP
    """

    def __init__(self, latents: torch.Tensor, semantic_latents: torch.Tensor, semantic_maps: torch.Tensor) -> None:
        self.latents, self.semantic_latents, self.semantic_maps = latents, semantic_latents, semantic_maps

    @classmethod
    @torch.no_grad()
    def encode(cls, arrays: dict, autoencoder: torch.nn.Module, scale: float, batch_size: int = 64,
               semantic: bool = True) -> LatentData:
        """Encode images (and, when ``semantic``, the maps scaled to [-1, 1]) with the frozen autoencoder."""
        device = next(autoencoder.parameters()).device
        # the encoder's activations grow with the slice: keep a batch at the pixels of 64 slices of 128 px
        batch_size = max(1, min(batch_size, 64 * 128 * 128 // int(np.prod(arrays["image"].shape[-2:]))))
        images = torch.from_numpy(arrays["image"]).unsqueeze(1)
        maps = torch.from_numpy(arrays["semantic_map"]).unsqueeze(1)
        latents, semantic_latents = [], []
        for start in range(0, len(images), batch_size):
            latents.append(encode_mean(autoencoder, images[start:start + batch_size].to(device)).cpu() * scale)
            if semantic:
                unit = semantic_to_unit(maps[start:start + batch_size]).to(device)
                semantic_latents.append(encode_mean(autoencoder, unit).cpu() * scale)
        return cls(torch.cat(latents), torch.cat(semantic_latents) if semantic else torch.empty(0), maps)

    def __len__(self) -> int:
        return len(self.latents)

    def batch(self, index: torch.Tensor, device: torch.device | None = None) -> tuple[torch.Tensor, SemanticCondition]:
        device = device or self.latents.device
        condition = SemanticCondition(self.semantic_latents[index].to(device),
                                      semantic_onehot(self.semantic_maps[index]).to(device))
        return self.latents[index].to(device), condition


class LatentCrops:
    """Training windows of whole-slice latents, with the feature levels of the nodule each window shows.

    Args:
        data: whole-slice latents, encoded maps and maps of one split.
        nodule_masks: (N, H, W) uint8, k inside the slice's k-th nodule.
        nodule_levels: per slice, a (n_nodules, F) long tensor of feature levels (see
            :func:`~lsdm_aug.models.unet.feature_levels`), F the same for every slice.
        crop_latent_px: window side in latent pixels (whole slices when it is not smaller than the latent).
        factor: the autoencoder's downsampling.
        nodule_share: share of windows placed around a nodule (on slices that have one).

    Example:
        >>> crops = LatentCrops(data, masks, levels, crop_latent_px=32, factor=4)  # doctest: +SKIP
        >>> latent, condition = crops.draw(16, torch.Generator().manual_seed(0))  # doctest: +SKIP
    """

    def __init__(self, data: LatentData, nodule_masks: torch.Tensor, nodule_levels: list[torch.Tensor],
                 crop_latent_px: int, factor: int, nodule_share: float = 0.5) -> None:
        if not 0.0 <= nodule_share <= 1.0:
            raise ValueError(f"nodule_share must be in [0, 1], got {nodule_share!r}")
        if len(nodule_masks) != len(data) or len(nodule_levels) != len(data):
            raise ValueError(f"{len(data)} latents but {len(nodule_masks)} nodule masks and {len(nodule_levels)} "
                             "feature rows")
        widths = {int(levels.shape[1]) for levels in nodule_levels}
        if len(widths) > 1:
            raise ValueError(f"every slice's feature rows must have one width, got {sorted(widths)}")
        self.data, self.masks, self.levels = data, nodule_masks, nodule_levels
        self.width = widths.pop() if widths else 0
        self.size = min(crop_latent_px, *data.latents.shape[-2:])
        self.factor, self.nodule_share = factor, nodule_share
        self.centres = [self._centres(mask, len(levels)) for mask, levels in zip(nodule_masks, nodule_levels)]

    @staticmethod
    def _centres(mask: torch.Tensor, count: int) -> list[tuple[float, float]]:
        centres = []
        for k in range(1, count + 1):
            rows, cols = torch.nonzero(mask == k, as_tuple=True)
            if len(rows):
                centres.append((float(rows.float().mean()), float(cols.float().mean())))
        return centres

    def __len__(self) -> int:
        return len(self.data)

    def _window(self, index: int, generator: torch.Generator) -> tuple[int, int]:
        height, width = self.data.latents.shape[-2:]
        if self.size >= min(height, width):
            return 0, 0
        centres = self.centres[index]
        if centres and torch.rand((), generator=generator) < self.nodule_share:
            row, col = centres[int(torch.randint(len(centres), (), generator=generator))]
            jitter = torch.randint(-(self.size // 4), self.size // 4 + 1, (2,), generator=generator)
            top, left = int(row / self.factor - self.size / 2 + jitter[0]), int(col / self.factor - self.size / 2 + jitter[1])
        else:
            top = int(torch.randint(height - self.size + 1, (), generator=generator))
            left = int(torch.randint(width - self.size + 1, (), generator=generator))
        return min(max(top, 0), height - self.size), min(max(left, 0), width - self.size)

    def _shown_levels(self, index: int, rows: slice, cols: slice) -> torch.Tensor:
        """The levels of the nodule with the most pixels in the window (zeros: none there)."""
        window = self.masks[index, rows, cols].long().flatten()
        counts = torch.bincount(window, minlength=len(self.levels[index]) + 1)[1:]
        if not len(counts) or counts.max() == 0:
            return torch.zeros(self.width, dtype=torch.long)
        return self.levels[index][int(counts.argmax())]

    def draw(self, count: int, generator: torch.Generator, device: torch.device | None = None
             ) -> tuple[torch.Tensor, SemanticCondition]:
        """``count`` windows (latent, condition with feature levels), drawn with ``generator``."""
        device = device or self.data.latents.device
        latents, semantic_latents, maps, levels = [], [], [], []
        for index in torch.randint(len(self.data), (count,), generator=generator).tolist():
            top, left = self._window(index, generator)
            rows, cols = slice(top, top + self.size), slice(left, left + self.size)
            image_rows = slice(top * self.factor, (top + self.size) * self.factor)
            image_cols = slice(left * self.factor, (left + self.size) * self.factor)
            latents.append(self.data.latents[index, :, rows, cols])
            semantic_latents.append(self.data.semantic_latents[index, :, rows, cols])
            maps.append(self.data.semantic_maps[index, :, image_rows, image_cols])
            levels.append(self._shown_levels(index, image_rows, image_cols))
        condition = SemanticCondition(torch.stack(semantic_latents).to(device),
                                      semantic_onehot(torch.stack(maps)).to(device), torch.stack(levels).to(device))
        return torch.stack(latents).to(device), condition


def drop_features(levels: torch.Tensor, drop_all: float, drop_each: float, generator: torch.Generator) -> torch.Tensor:
    """Feature levels with some set to 0 ("not given") for classifier-free guidance: a row loses all four
    with probability ``drop_all``, otherwise each feature alone with probability ``drop_each``.

    Example:
        >>> drop_features(torch.tensor([[5, 3, 2, 1]]), 1.0, 0.0, torch.Generator()).tolist()
        [[0, 0, 0, 0]]
    """
    rows = torch.rand((len(levels), 1), generator=generator) < drop_all
    each = torch.rand(tuple(levels.shape), generator=generator) < drop_each
    return torch.where((rows | each).to(levels.device), torch.zeros_like(levels), levels)


def nodule_weighted_mse(prediction: torch.Tensor, noise: torch.Tensor, onehot: torch.Tensor,
                        nodule_weight: float = 1.0) -> torch.Tensor:
    """Noise-prediction MSE with the nodules' latent footprint weighed ``nodule_weight`` times the rest.

    The footprint is the one-hot map's nodule labels (5, 6, 7) max-pooled to the latent's size and dilated by
    one latent pixel (the decoder's reach); the weighted sum is divided by the sum of the weights, so that
    ``nodule_weight = 1`` is exactly the plain MSE and the loss keeps its scale for any weight.

    Example:
        >>> onehot = torch.zeros(1, 8, 16, 16); onehot[:, 0] = 1
        >>> error = torch.zeros(1, 3, 4, 4); error[..., 0, 0] = 1.0
        >>> round(float(nodule_weighted_mse(error, torch.zeros_like(error), onehot, 10.0)), 4)  # no nodule: MSE
        0.0625
    """
    squared = (prediction - noise).square()
    if nodule_weight == 1.0:
        return squared.mean()
    factor = onehot.shape[-1] // prediction.shape[-1]
    nodules = onehot[:, int(SemanticLabel.NODULE_BENIGN):].amax(1, keepdim=True)
    footprint = F.max_pool2d(F.max_pool2d(nodules, factor), 3, stride=1, padding=1)
    weights = 1.0 + (nodule_weight - 1.0) * footprint.to(squared.dtype)
    return (squared * weights).sum() / (weights.sum() * squared.shape[1])


def load_latent_crops(data_dir: str | Path, split: str, autoencoder: torch.nn.Module, scale: float,
                      crop_latent_px: int, factor: int, nodule_share: float, limit: int | None = None,
                      features: tuple[str, ...] = FEATURES, cache: Path | None = None,
                      write_cache: bool = True) -> LatentCrops:
    """Encode one split of a prepared dataset and wrap it as :class:`LatentCrops`, with the nodules' levels of
    ``features`` (columns of its ``features.csv``); with ``cache`` (see :func:`latent_cache_path`) the encoding
    is read from there when present and written there (atomically) when made and ``write_cache``."""
    arrays = load_split_arrays(data_dir, split, ("image", "semantic_map", "nodule_mask"), limit=limit)
    dataset = PreparedDataset(data_dir, split=split)
    case_ids = dataset.case_ids()[:len(arrays["image"])]
    by_case = {case: rows.sort_values("nodule_index") for case, rows in dataset.features.groupby("case_id")}
    levels = []
    for case in case_ids:
        rows = by_case.get(case)
        if rows is None or rows.empty:
            levels.append(torch.zeros(0, len(features), dtype=torch.long))
        else:
            levels.append(torch.cat([feature_levels({f: float(r[f]) for f in features}, names=features)
                                     for _, r in rows.iterrows()]))
    data = _encoded(arrays, autoencoder, scale, split, cache, write_cache)
    return LatentCrops(data, torch.from_numpy(arrays["nodule_mask"]), levels, crop_latent_px, factor, nodule_share)


def latent_cache_path(model_dir: str | Path, data_dir: str | Path, split: str, limit: int | None) -> Path:
    """Where :func:`load_latent_crops` keeps one split's encoding: named by the autoencoder's weights and config
    and the prepared dataset (its records, and each case file's name, size and modification time), so another
    autoencoder or a dataset written again never reads it.

    Example:
        >>> latent_cache_path("/tmp/model", "/tmp/data", "train", 640).parent.name
        'latent_cache'
    """
    key = hashlib.sha256(f"{split}:{limit}".encode())
    model, data = Path(model_dir), Path(data_dir)
    for path in (model / AUTOENCODER_FILE, config_path(model / AUTOENCODER_FILE), data / "dataset.json",
                 data / "splits.json", data / "cases.csv"):
        key.update(path.name.encode())
        key.update(path.read_bytes() if path.is_file() else b"")
    for case in sorted((data / "cases").glob("*")) if (data / "cases").is_dir() else []:
        status = case.stat()
        key.update(f"{case.name}:{status.st_size}:{status.st_mtime_ns}".encode())
    return model / LATENT_CACHE_DIR / f"{split}-{key.hexdigest()[:16]}.safetensors"


def _encoded(arrays: dict, autoencoder: torch.nn.Module, scale: float, split: str, cache: Path | None,
             write: bool = True) -> LatentData:
    """The split's encoding, read from ``cache`` when it holds this many slices at this scale; else encoded, and
    written to ``cache`` (``write``: one DDP process writes, every process reads) in place of the split's older
    encodings."""
    maps = torch.from_numpy(arrays["semantic_map"]).unsqueeze(1)
    if cache is not None and cache.is_file():
        try:
            tensors, recorded = load_tensors(cache), read_config(cache)
        except CheckpointError:  # damaged (e.g. the disk filled up): encode again below
            tensors, recorded = {}, {}
        if recorded.get("slices") == len(maps) and recorded.get("scale") == scale and len(tensors) == 2:
            return LatentData(tensors["latents"], tensors["semantic_latents"], maps)
    data = LatentData.encode(arrays, autoencoder, scale)
    if cache is not None and write:
        save_tensors(cache, {"latents": data.latents, "semantic_latents": data.semantic_latents},
                     {"slices": len(maps), "scale": scale})
        for older in cache.parent.glob(f"{split}-*.safetensors"):
            if older != cache:
                older.unlink(missing_ok=True)
                config_path(older).unlink(missing_ok=True)
    return data


@torch.no_grad()
def _validation_loss(unet: torch.nn.Module, crops: LatentCrops, scheduler, device: torch.device,
                     windows: int = 128) -> float:
    """Noise-prediction MSE on held-out windows at fixed places, timesteps and noise (comparable across
    checkpoints), with every feature given."""
    generator = torch.Generator().manual_seed(1234)
    losses, elements = [], 0
    for start in range(0, windows, 32):
        latent, condition = crops.draw(min(32, windows - start), generator, device)
        noise = torch.randn(latent.shape, generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (len(latent),), generator=generator).to(device)
        prediction = predict_noise(unet, scheduler.add_noise(latent, noise, timesteps), timesteps, condition)
        losses.append(F.mse_loss(prediction, noise, reduction="sum").item())
        elements += latent.numel()
    return sum(losses) / max(elements, 1)


def parameter_groups(unet: torch.nn.Module, learning_rate: float, feature_lr_scale: float = 1.0) -> list[dict]:
    """The U-Net's parameters for the optimizer: the feature embedding of a feature-conditioned U-Net in a group
    of its own at ``learning_rate * feature_lr_scale``, everything else at ``learning_rate``.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> [group["lr"] for group in parameter_groups(net, 1e-4)]
        [0.0001]
    """
    embedding = getattr(unet, "class_embedding", None)
    own = [] if embedding is None or not is_feature_conditioned(unet) else list(embedding.parameters())
    rest = [p for p in unet.parameters() if all(p is not q for q in own)]
    groups = [{"params": rest, "lr": learning_rate}]
    if own:
        groups.append({"params": own, "lr": learning_rate * feature_lr_scale})
    return groups


def train_diffusion(recipe: Recipe, data_dir: str | Path, model_dir: str | Path, device: str | None = None,
                    seed: int = 0, progress: bool = True, max_validation: int = 128) -> dict[str, Any]:
    """Train (or resume) the SPADE U-Net in ``model_dir``, which must hold the trained autoencoder.

    Writes ``unet.safetensors`` (EMA weights) with its JSON config, and ``unet_state.safetensors`` to resume.
    """
    context = DistributedContext.from_environment(device)
    settings, model_dir = recipe.train_diffusion, Path(model_dir)
    autoencoder, scale = load_autoencoder(model_dir, recipe, context.device)
    factor = recipe.autoencoder.downsampling
    crop_latent = (settings.crop_px or recipe.image_size) // factor
    features = tuple(recipe.diffusion.conditioned_features)
    limits = {"train": settings.max_train_slices or None, "validation": max_validation}
    train, validation = (load_latent_crops(data_dir, split, autoencoder, scale, crop_latent, factor,
                                           settings.nodule_share, limit=limit, features=features,
                                           cache=latent_cache_path(model_dir, data_dir, split, limit),
                                           write_cache=context.is_main)
                         for split, limit in limits.items())
    torch.manual_seed(seed)
    unet = build_unet(recipe.diffusion, recipe.autoencoder.latent_channels).to(context.device)
    optimizer = torch.optim.AdamW(parameter_groups(unet, settings.learning_rate, settings.feature_lr_scale))
    start, history = 0, []
    state_path = model_dir / STATE_FILE
    if state_path.exists():
        ema = EMA(unet, settings.ema_decay)
        meta = load_training_state(state_path, {"unet": unet, "ema": ema.model}, {"unet": optimizer})
        start, history, ema.updates = int(meta["step"]), list(meta["history"]), int(meta["ema_updates"])
    else:
        if settings.init_from:
            initialise_from(unet, settings.init_from, UNET_FILE)
        ema = EMA(unet, settings.ema_decay)
    conditioned = is_feature_conditioned(unet)
    model = context.wrap(unet)
    scheduler = training_scheduler(recipe.diffusion)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + context.rank * 7919 + start)
    spacing = training_spacing(data_dir)
    started = time.perf_counter()
    with make_progress() as bar:
        task = bar.add_task("diffusion", total=settings.steps, completed=start, rate="", visible=progress and context.is_main)
        for step in range(start, settings.steps):
            latent, condition = train.draw(settings.batch_size, generator, context.device)
            if conditioned:
                condition.features = drop_features(condition.features, settings.feature_dropout_all,
                                                   settings.feature_dropout, generator)
            noise = torch.randn(latent.shape, generator=generator).to(context.device)
            timesteps = torch.randint(0, scheduler.num_train_timesteps, (len(latent),), generator=generator).to(context.device)
            prediction = predict_noise(model, scheduler.add_noise(latent, noise, timesteps), timesteps, condition)
            loss = nodule_weighted_mse(prediction, noise, condition.onehot, settings.nodule_loss_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema.update(model)
            bar.update(task, advance=1, rate=f"loss {loss.item():.4f}")
            done = step + 1
            if done % settings.validate_every == 0 or done == settings.steps:
                if context.is_main:
                    history.append({"step": done, "seconds": round(time.perf_counter() - started, 1),
                                    "validation_mse": _validation_loss(ema.model, validation, scheduler, context.device)})
                    bar.console.print(f"step {done}: validation noise MSE {history[-1]['validation_mse']:.4f}")
                    config = {"component": "unet", "recipe": recipe.name, "image_size": recipe.image_size,
                              "latent_channels": recipe.autoencoder.latent_channels,
                              "diffusion": recipe.to_dict()["diffusion"], "steps": done, "ema_decay": settings.ema_decay,
                              "crop_px": crop_latent * factor, "spacing_mm": spacing,
                              "serves_spacing_mm": [min(0.4, spacing["min"]), max(3.0, spacing["max"])],
                              "training": recipe.to_dict()["train_diffusion"],
                              "validation": history[-1], "history": history}
                    save_weights(model_dir / UNET_FILE, ema.model, config)
                    save_training_state(state_path, {"unet": unet, "ema": ema.model}, {"unet": optimizer},
                                        {"step": done, "history": history, "ema_updates": ema.updates})
                context.barrier()
    context.close()
    return history[-1] if history else {}
