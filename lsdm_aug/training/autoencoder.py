"""Stage 1: the KL autoencoder, with L1 reconstruction + patch-adversarial + small KL terms.

The autoencoder is fully convolutional, so it trains on random crops (``crop_px``) and is
validated on whole held-out slices (SSIM / PSNR with MONAI's metrics, next to a Gaussian-blur
baseline it must beat). The state is saved every ``validate_every`` steps and a rerun resumes;
under ``torchrun`` each process draws its own crops and DDP averages the gradients.

Example:
    >>> from lsdm_aug.config import load_recipe
    >>> train_autoencoder(load_recipe("phantom-smoke"), "prepared/phantom-64", "models/smoke")  # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import PatchAdversarialLoss
from monai.metrics import PSNRMetric, SSIMMetric
from scipy import ndimage

from lsdm_aug.config import AutoencoderTraining, Recipe, RecipeError
from lsdm_aug.models.autoencoder import build_autoencoder, build_discriminator, latent_scale_factor
from lsdm_aug.models.perceptual import PerceptualDistance
from lsdm_aug.models.checkpoint import load_training_state, save_training_state, save_weights
from lsdm_aug.progress import make_progress
from lsdm_aug.training.common import DistributedContext, initialise_from, load_split_arrays, random_crops, training_spacing

__all__ = ["train_autoencoder", "kl_divergence", "reconstruction_metrics", "AUTOENCODER_FILE"]

AUTOENCODER_FILE = "autoencoder.safetensors"
STATE_FILE = "autoencoder_state.safetensors"


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)), summed over latent elements and averaged over the batch."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1)
    return kl.flatten(1).sum(1).mean()


@torch.no_grad()
def reconstruction_metrics(autoencoder: torch.nn.Module, images: torch.Tensor, batch_size: int = 32) -> dict[str, float]:
    """SSIM and PSNR of reconstructions of ``images`` (N, 1, H, W) in [-1, 1], and of a 1 px Gaussian blur.

    Per-sample values are averaged here rather than with the metrics' ``aggregate()``, which gathers across
    processes: validation runs on rank 0 only, so a gather there would wait forever for the other ranks.
    """
    autoencoder = getattr(autoencoder, "module", autoencoder)
    batch_size = max(1, min(batch_size, 32 * 128 * 128 // int(np.prod(images.shape[-2:]))))  # memory: pixels, not slices
    autoencoder.eval()
    ssim, psnr = SSIMMetric(spatial_dims=2, data_range=2.0), PSNRMetric(max_val=2.0)
    values: dict[str, list[torch.Tensor]] = {"ssim": [], "psnr_db": [], "blur_ssim": [], "blur_psnr_db": []}
    device = next(autoencoder.parameters()).device
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        reconstruction = autoencoder.reconstruct(batch).clamp(-1, 1)
        blurred = torch.from_numpy(ndimage.gaussian_filter(batch.cpu().numpy(), (0, 0, 1, 1))).to(device)
        for prefix, candidate in (("", reconstruction), ("blur_", blurred)):
            values[f"{prefix}ssim"].append(ssim(candidate, batch).flatten())
            values[f"{prefix}psnr_db"].append(psnr(candidate, batch).flatten())
    autoencoder.train()
    return {name: float(torch.cat(parts).mean()) for name, parts in values.items()}


def _perceptual(settings: AutoencoderTraining, device: torch.device) -> PerceptualDistance | None:
    """The optional perceptual term: only from local weights, never downloaded."""
    if settings.perceptual_weight <= 0:
        return None
    if not settings.perceptual_weights_path:
        raise RecipeError("train_autoencoder.perceptual_weight > 0 needs train_autoencoder.perceptual_weights_path "
                          "(a local ResNet weight file; nothing is downloaded)")
    return PerceptualDistance(settings.perceptual_weights_path, settings.perceptual_depth).to(device)


def train_autoencoder(recipe: Recipe, data_dir: str | Path, out_dir: str | Path, device: str | None = None,
                      seed: int = 0, progress: bool = True, max_validation: int = 64) -> dict[str, Any]:
    """Train (or resume) the autoencoder of ``recipe`` on a prepared dataset; returns the final metrics.

    Writes ``out_dir/autoencoder.safetensors`` (+ ``.json`` with the config, the latent scale factor and the
    validation figures) and ``out_dir/autoencoder_state.safetensors`` (optimizers, step) for resuming.
    """
    context = DistributedContext.from_environment(device)
    settings = recipe.train_autoencoder
    out_dir = Path(out_dir)
    train = torch.from_numpy(load_split_arrays(data_dir, "train", ("image",))["image"]).unsqueeze(1)
    validation = torch.from_numpy(load_split_arrays(data_dir, "validation", ("image",), limit=max_validation)["image"]
                                  ).unsqueeze(1)
    torch.manual_seed(seed)
    autoencoder = build_autoencoder(recipe.autoencoder).to(context.device)
    discriminator = build_discriminator().to(context.device)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=settings.learning_rate)
    optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=settings.learning_rate)
    start, history = 0, []
    state_path = out_dir / STATE_FILE
    if state_path.exists():
        meta = load_training_state(state_path, {"autoencoder": autoencoder, "discriminator": discriminator},
                                   {"autoencoder": optimizer, "discriminator": optimizer_d})
        start, history = int(meta["step"]), list(meta["history"])
    elif settings.init_from:
        initialise_from(autoencoder, settings.init_from, AUTOENCODER_FILE)
    model, critic = context.wrap(autoencoder), context.wrap(discriminator)
    adversarial = PatchAdversarialLoss(criterion="least_squares")
    perceptual = _perceptual(settings, context.device)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + context.rank * 7919 + start)  # resumes draw anew
    started = time.perf_counter()
    with make_progress() as bar:
        task = bar.add_task("autoencoder", total=settings.steps, completed=start, rate="", visible=progress and context.is_main)
        for step in range(start, settings.steps):
            batch = random_crops(train, settings.crop_px, settings.batch_size, generator).to(context.device)
            reconstruction, z_mu, z_sigma = model(batch)
            loss = (reconstruction - batch).abs().mean() + settings.kl_weight * kl_divergence(z_mu, z_sigma)
            if perceptual is not None:
                loss = loss + settings.perceptual_weight * perceptual(reconstruction, batch).mean()
            use_adversarial = step >= settings.adversarial_start and settings.adversarial_weight > 0
            if use_adversarial:
                fake = critic(reconstruction.contiguous())[-1]
                loss = loss + settings.adversarial_weight * adversarial(fake, target_is_real=True, for_discriminator=False)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if use_adversarial:
                fake = critic(reconstruction.detach().contiguous())[-1]
                real = critic(batch.contiguous())[-1]
                loss_d = 0.5 * (adversarial(fake, target_is_real=False, for_discriminator=True)
                                + adversarial(real, target_is_real=True, for_discriminator=True))
                optimizer_d.zero_grad(set_to_none=True)
                loss_d.backward()
                optimizer_d.step()
            bar.update(task, advance=1, rate=f"loss {loss.item():.4f}")
            done = step + 1
            if done % settings.validate_every == 0 or done == settings.steps:
                if context.is_main:
                    metrics = reconstruction_metrics(model, validation)
                    history.append({"step": done, "seconds": round(time.perf_counter() - started, 1), **metrics})
                    bar.console.print(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in history[-1].items()
                                                                     if k != "step"))
                    _save(out_dir, recipe, autoencoder, train, history, done, training_spacing(data_dir))
                    save_training_state(state_path, {"autoencoder": autoencoder, "discriminator": discriminator},
                                        {"autoencoder": optimizer, "discriminator": optimizer_d},
                                        {"step": done, "history": history, "recipe": recipe.name})
                context.barrier()
    context.close()
    return history[-1] if history else {}


def _save(out_dir: Path, recipe: Recipe, autoencoder: torch.nn.Module, train: torch.Tensor,
          history: list[dict], step: int, spacing: dict[str, float]) -> None:
    sample = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:64]]
    scale = latent_scale_factor(autoencoder, sample.to(next(autoencoder.parameters()).device))
    config = {"component": "autoencoder", "recipe": recipe.name, "image_size": recipe.image_size,
              "autoencoder": recipe.to_dict()["autoencoder"], "scale_factor": scale, "steps": step,
              "spacing_mm": spacing, "training": recipe.to_dict()["train_autoencoder"],
              "validation": history[-1], "history": history}
    save_weights(out_dir / AUTOENCODER_FILE, autoencoder, config)
