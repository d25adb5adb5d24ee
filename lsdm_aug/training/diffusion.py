"""Stage 2: the latent semantic diffusion U-Net (LSDM thesis, Algorithm 1).

The frozen autoencoder encodes every training slice and its semantic map (scaled to [-1, 1]) once;
each step draws t uniformly, noises the latent with the linear-beta forward process, and regresses
the noise from ``Concat(z_t, E(m))`` with SPADE fed the one-hot map. An EMA of the weights is what
gets saved. Resumable; DDP under ``torchrun``.

Example:
    >>> train_diffusion(load_recipe("phantom-smoke"), "prepared/phantom-64", "models/smoke")  # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lsdm_aug.config import Recipe
from lsdm_aug.models.autoencoder import build_autoencoder, encode_mean
from lsdm_aug.models.checkpoint import load_training_state, load_weights, save_training_state, save_weights
from lsdm_aug.models.unet import SemanticCondition, build_unet, predict_noise, semantic_onehot, semantic_to_unit
from lsdm_aug.progress import make_progress
from lsdm_aug.sampling.schedulers import training_scheduler
from lsdm_aug.training.autoencoder import AUTOENCODER_FILE
from lsdm_aug.training.common import EMA, DistributedContext, load_split_arrays

__all__ = ["train_diffusion", "LatentData", "load_autoencoder", "UNET_FILE"]

UNET_FILE = "unet.safetensors"
STATE_FILE = "unet_state.safetensors"


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


@torch.no_grad()
def _validation_loss(unet: torch.nn.Module, data: LatentData, scheduler, device: torch.device) -> float:
    """Noise-prediction MSE on held-out slices at fixed timesteps and noise (comparable across checkpoints)."""
    generator = torch.Generator().manual_seed(1234)
    losses = []
    for start in range(0, len(data), 32):
        index = torch.arange(start, min(start + 32, len(data)))
        latent, condition = data.batch(index, device)
        noise = torch.randn(latent.shape, generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (len(index),), generator=generator).to(device)
        prediction = predict_noise(unet, scheduler.add_noise(latent, noise, timesteps), timesteps, condition)
        losses.append(F.mse_loss(prediction, noise, reduction="sum").item())
    return sum(losses) / max(data.latents.numel(), 1)


def train_diffusion(recipe: Recipe, data_dir: str | Path, model_dir: str | Path, device: str | None = None,
                    seed: int = 0, progress: bool = True, max_validation: int = 128) -> dict[str, Any]:
    """Train (or resume) the SPADE U-Net in ``model_dir``, which must hold the trained autoencoder.

    Writes ``unet.safetensors`` (EMA weights) with its JSON config, and ``unet_state.safetensors`` to resume.
    """
    context = DistributedContext.from_environment(device)
    settings, model_dir = recipe.train_diffusion, Path(model_dir)
    autoencoder, scale = load_autoencoder(model_dir, recipe, context.device)
    train = LatentData.encode(load_split_arrays(data_dir, "train"), autoencoder, scale)
    validation = LatentData.encode(load_split_arrays(data_dir, "validation", limit=max_validation), autoencoder, scale)
    torch.manual_seed(seed)
    unet = build_unet(recipe.diffusion, recipe.autoencoder.latent_channels).to(context.device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.learning_rate)
    ema = EMA(unet, settings.ema_decay)
    start, history = 0, []
    state_path = model_dir / STATE_FILE
    if state_path.exists():
        meta = load_training_state(state_path, {"unet": unet, "ema": ema.model}, {"unet": optimizer})
        start, history, ema.updates = int(meta["step"]), list(meta["history"]), int(meta["ema_updates"])
    model = context.wrap(unet)
    scheduler = training_scheduler(recipe.diffusion)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + context.rank * 7919 + start)
    started = time.perf_counter()
    with make_progress() as bar:
        task = bar.add_task("diffusion", total=settings.steps, completed=start, rate="", visible=progress and context.is_main)
        for step in range(start, settings.steps):
            index = torch.randint(len(train), (settings.batch_size,), generator=generator)
            latent, condition = train.batch(index, context.device)
            noise = torch.randn(latent.shape, generator=generator).to(context.device)
            timesteps = torch.randint(0, scheduler.num_train_timesteps, (len(index),), generator=generator).to(context.device)
            loss = F.mse_loss(predict_noise(model, scheduler.add_noise(latent, noise, timesteps), timesteps, condition), noise)
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
                              "validation": history[-1], "history": history}
                    save_weights(model_dir / UNET_FILE, ema.model, config)
                    save_training_state(state_path, {"unet": unet, "ema": ema.model}, {"unet": optimizer},
                                        {"step": done, "history": history, "ema_updates": ema.updates})
                context.barrier()
    context.close()
    return history[-1] if history else {}
