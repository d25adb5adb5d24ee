"""The SPADE GAN baseline of the generation benchmark (thesis Table 5.1): semantic map -> slice in one pass.

MONAI's ``SPADENet`` generator (without its VAE encoder: the map alone decides the slice) is trained
against a ``PatchDiscriminator`` that sees the slice next to its one-hot map (pix2pix / SPADE style),
with least-squares adversarial loss and an L1 term to the paired real slice. Weights are
safetensors + JSON; training resumes from ``spade_gan_state.safetensors``.

Example:
    >>> train_spade_gan(load_recipe("phantom-smoke"), "prepared/phantom-64", "models/baselines")  # doctest: +SKIP
    >>> generator = load_spade_gan("models/baselines")  # doctest: +SKIP
    >>> slices = generator(semantic_onehot(maps))[0]  # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator, SPADENet

from lsdm_aug.config import Recipe, recipe_from_dict
from lsdm_aug.data.semantic import NUM_LABELS
from lsdm_aug.models.checkpoint import load_training_state, load_weights, read_config, save_training_state, save_weights
from lsdm_aug.models.unet import semantic_onehot
from lsdm_aug.progress import make_progress
from lsdm_aug.training.common import DistributedContext, load_split_arrays

__all__ = ["build_spade_gan", "train_spade_gan", "load_spade_gan", "SPADE_GAN_FILE"]

SPADE_GAN_FILE = "spade_gan.safetensors"
STATE_FILE = "spade_gan_state.safetensors"


def build_spade_gan(recipe: Recipe) -> tuple[SPADENet, PatchDiscriminator]:
    """Generator (one-hot map -> slice) and discriminator (slice + one-hot map -> patch scores)."""
    config = recipe.spade_gan
    generator = SPADENet(spatial_dims=2, in_channels=1, out_channels=1, label_nc=NUM_LABELS,
                         input_shape=(recipe.image_size, recipe.image_size), channels=list(config.channels),
                         is_vae=False, spade_intermediate_channels=config.spade_intermediate_channels)
    discriminator = PatchDiscriminator(spatial_dims=2, channels=config.discriminator_channels,
                                       in_channels=1 + NUM_LABELS, num_layers_d=3)
    return generator, discriminator


def _generate(generator: torch.nn.Module, onehot: torch.Tensor) -> torch.Tensor:
    return torch.tanh(generator(onehot)[0])


def train_spade_gan(recipe: Recipe, data_dir: str | Path, out_dir: str | Path, device: str | None = None,
                    seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the SPADE GAN baseline; writes ``spade_gan.safetensors`` (+ JSON) in ``out_dir``."""
    context = DistributedContext.from_environment(device)
    settings, out_dir = recipe.train_spade_gan, Path(out_dir)
    arrays = load_split_arrays(data_dir, "train")
    images = torch.from_numpy(arrays["image"]).float().unsqueeze(1)
    maps = torch.from_numpy(arrays["semantic_map"]).unsqueeze(1)
    held_out = load_split_arrays(data_dir, "validation", limit=32)
    torch.manual_seed(seed)
    generator, discriminator = (n.to(context.device) for n in build_spade_gan(recipe))
    optimizer_g = torch.optim.Adam(generator.parameters(), lr=settings.learning_rate, betas=(0.5, 0.999))
    optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=settings.learning_rate, betas=(0.5, 0.999))
    start, history, state_path = 0, [], out_dir / STATE_FILE
    if state_path.exists():
        meta = load_training_state(state_path, {"generator": generator, "discriminator": discriminator},
                                   {"generator": optimizer_g, "discriminator": optimizer_d})
        start, history = int(meta["step"]), list(meta["history"])
    adversarial = PatchAdversarialLoss(criterion="least_squares")
    draw, started = torch.Generator().manual_seed(seed * 1_000_003 + start), time.perf_counter()
    with make_progress() as bar:
        task = bar.add_task("spade gan", total=settings.steps, completed=start, rate="", visible=progress)
        for step in range(start, settings.steps):
            index = torch.randint(len(images), (settings.batch_size,), generator=draw)
            real, onehot = images[index].to(context.device), semantic_onehot(maps[index]).to(context.device)
            fake = _generate(generator, onehot)
            loss_g = settings.l1_weight * (fake - real).abs().mean() + settings.adversarial_weight * adversarial(
                discriminator(torch.cat([fake, onehot], 1))[-1], target_is_real=True, for_discriminator=False)
            optimizer_g.zero_grad(set_to_none=True)
            loss_g.backward()
            optimizer_g.step()
            loss_d = 0.5 * (adversarial(discriminator(torch.cat([fake.detach(), onehot], 1))[-1], target_is_real=False,
                                        for_discriminator=True)
                            + adversarial(discriminator(torch.cat([real, onehot], 1))[-1], target_is_real=True,
                                          for_discriminator=True))
            optimizer_d.zero_grad(set_to_none=True)
            loss_d.backward()
            optimizer_d.step()
            bar.update(task, advance=1, rate=f"G {loss_g.item():.3f} D {loss_d.item():.3f}")
            done = step + 1
            if done % settings.validate_every == 0 or done == settings.steps:
                history.append({"step": done, "seconds": round(time.perf_counter() - started, 1),
                                "validation_l1": _validation_l1(generator, held_out, context.device)})
                save_weights(out_dir / SPADE_GAN_FILE, generator,
                             {"component": "spade_gan", "recipe": recipe.name, "image_size": recipe.image_size,
                              "spade_gan": recipe.to_dict()["spade_gan"], "steps": done, "history": history})
                save_training_state(state_path, {"generator": generator, "discriminator": discriminator},
                                    {"generator": optimizer_g, "discriminator": optimizer_d},
                                    {"step": done, "history": history})
    return history[-1] if history else {}


@torch.no_grad()
def _validation_l1(generator: torch.nn.Module, held_out: dict, device: torch.device) -> float:
    generator.eval()
    onehot = semantic_onehot(torch.from_numpy(held_out["semantic_map"]).unsqueeze(1)).to(device)
    real = torch.from_numpy(held_out["image"]).float().unsqueeze(1).to(device)
    value = float((_generate(generator, onehot) - real).abs().mean())
    generator.train()
    return value


def load_spade_gan(model_dir: str | Path, device: str = "cpu"):
    """The trained generator of ``model_dir`` as a function: (B, 1, H, W) label maps -> (B, 1, H, W) slices."""
    path = Path(model_dir) / SPADE_GAN_FILE
    config = read_config(path)
    recipe = recipe_from_dict({"image_size": config["image_size"], "spade_gan": config["spade_gan"]})
    generator = build_spade_gan(recipe)[0]
    load_weights(path, generator)
    generator = generator.to(device).eval().requires_grad_(False)

    def generate(maps: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _generate(generator, semantic_onehot(maps.long()).to(device))

    return generate
