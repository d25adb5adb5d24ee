"""The one reverse-diffusion loop of lsdm-aug: DDPM or DDIM, optional guidance, optional known region.

MONAI's ``DiffusionInferer.sample`` runs under ``no_grad`` and has no masked in-painting, so the
loop lives here. Per step it predicts the noise (with classifier-free guidance, see
:func:`guided_noise`: both passes in one batched U-Net call), turns the guidance score into an adjusted noise
(``eps - sqrt(1 - alpha_bar_t) * score``, which for DDPM adds ``~ sigma_t^2 * score`` to the mean and
works unchanged for DDIM), steps the MONAI scheduler, and, when a known region is given, replaces
that region with the original latent noised to the next timestep (RePaint), so the generated part
stays consistent with what surrounds it. One ``torch.Generator`` drives every random draw.

Example:
    >>> from lsdm_aug.sampling.schedulers import build_scheduler
    >>> latents = sample_latents(unet, build_scheduler(config, "ddim", 50), condition,
    ...                          shape=(1, 3, 32, 32), generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.networks.schedulers import Scheduler

from lsdm_aug.models.unet import SemanticCondition, is_feature_conditioned, predict_noise

__all__ = ["KnownRegion", "sample_latents", "random_normal", "Generators", "guided_noise", "cfg_pair"]

Generators = torch.Generator | Sequence[torch.Generator] | None


def random_normal(shape: Sequence[int], generator: Generators) -> torch.Tensor:
    """Standard normal noise on the CPU; with one generator per sample, sample ``i`` comes from generator ``i``
    alone, so a batch gives each sample what it would get on its own."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device="cpu")
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device="cpu") for g in generator])


@dataclass
class KnownRegion:
    """What must stay: the clean (scaled) latent and a mask, 1 where the latent is known."""

    latent: torch.Tensor
    mask: torch.Tensor

    def at(self, scheduler: Scheduler, timestep: int | None, generator: Generators) -> torch.Tensor:
        """The known latent noised to ``timestep`` (clean when ``None``, i.e. after the last step)."""
        if timestep is None:
            return self.latent
        noise = random_normal(self.latent.shape, generator).to(self.latent)
        timesteps = torch.full((len(self.latent),), int(timestep), dtype=torch.long, device=self.latent.device)
        return scheduler.add_noise(self.latent, noise, timesteps)


def guided_noise(unet: torch.nn.Module, latent: torch.Tensor, timesteps: torch.Tensor, condition: SemanticCondition,
                 cfg_scale: float = 1.0, paired: SemanticCondition | None = None) -> torch.Tensor:
    """The noise prediction with classifier-free guidance: ``eps(null) + w * (eps(features) - eps(null))``.

    ``w = 1`` is the plain conditional prediction and ``w = 0`` the unconditional one (each computed alone,
    so both are exact); any other ``w`` runs the conditional and the null pass as one batch of ``2 B`` (its
    condition ``paired``, :func:`cfg_pair`, built here unless a sampler passes the one it built for all steps).
    Without given features, or with a U-Net that takes none, it is the plain prediction.

    Example:
        >>> noise = guided_noise(unet, z_t, t, condition.with_features(levels), cfg_scale=2.0)  # doctest: +SKIP
    """
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale!r}")
    if not _steers(unet, condition) or cfg_scale == 1.0:
        return predict_noise(unet, latent, timesteps, condition)
    if cfg_scale == 0.0:
        return predict_noise(unet, latent, timesteps, condition.with_features(None))
    both = predict_noise(unet, torch.cat([latent, latent]), torch.cat([timesteps, timesteps]),
                         cfg_pair(condition) if paired is None else paired)
    conditional, null = both.chunk(2)
    return null + cfg_scale * (conditional - null)


def _steers(unet: torch.nn.Module, condition: SemanticCondition) -> bool:
    """Whether ``condition`` gives features that ``unet`` takes (else CFG is the plain prediction)."""
    given = condition.features is not None and bool((condition.features != 0).any())
    return given and is_feature_conditioned(unet)


def _runs_paired(unet: torch.nn.Module, condition: SemanticCondition, cfg_scale: float) -> bool:
    """Whether :func:`guided_noise` runs the conditional and the null pass as one batch."""
    return cfg_scale not in (0.0, 1.0) and _steers(unet, condition)


def cfg_pair(condition: SemanticCondition) -> SemanticCondition:
    """The batch of ``2 B`` that classifier-free guidance runs: the condition with its features, then without."""
    return SemanticCondition.cat([condition, condition.with_features(None)])


@torch.no_grad()
def sample_latents(unet: torch.nn.Module, scheduler: Scheduler, condition: SemanticCondition,
                   shape: tuple[int, ...] | None = None, generator: Generators = None,
                   initial_noise: torch.Tensor | None = None,
                   guidance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                   known: KnownRegion | None = None,
                   on_step: Callable[[int, int], None] | None = None, cfg_scale: float = 1.0) -> torch.Tensor:
    """Run the reverse process from noise to a clean (scaled) latent.

    Args:
        unet: the latent semantic diffusion U-Net.
        scheduler: a MONAI DDPM or DDIM scheduler with its timesteps set.
        condition: encoded map and one-hot map for every sample of the batch.
        shape: latent shape (B, C, h, w); or give ``initial_noise``.
        generator: CPU generator for every random draw (initial noise, DDPM noise, RePaint noise), or one
            per sample: then each sample's initial and RePaint noise come from its own generator and, with
            DDIM (no step noise), a batch gives exactly what each sample gives alone.
        initial_noise: z_T, when the caller draws it.
        guidance: ``score = guidance(z_t, t)``, e.g. :class:`~lsdm_aug.sampling.guidance.ClassifierGuidance`.
        known: region to keep (RePaint-style re-noising at every step).
        on_step: called with (step index, number of steps), e.g. to advance a progress bar.
        cfg_scale: classifier-free guidance scale ``w`` on ``condition.features`` (see :func:`guided_noise`).
    """
    device = condition.latent.device
    if initial_noise is None:
        if shape is None:
            raise ValueError("give the latent shape or the initial noise")
        initial_noise = random_normal(shape, generator)
    latent = initial_noise.to(device)
    timesteps = [int(t) for t in scheduler.timesteps]
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    step_generator = generator if generator is None or isinstance(generator, torch.Generator) else generator[0]
    paired = cfg_pair(condition) if _runs_paired(unet, condition, cfg_scale) else None
    for index, timestep in enumerate(timesteps):
        batch_timesteps = torch.full((len(latent),), timestep, dtype=torch.long, device=device)
        noise = guided_noise(unet, latent, batch_timesteps, condition, cfg_scale, paired)
        if guidance is not None:
            noise = noise - torch.sqrt(1.0 - alphas_cumprod[timestep]) * guidance(latent, batch_timesteps)
        latent, _ = scheduler.step(noise, timestep, latent, generator=step_generator)
        if known is not None:
            following = timesteps[index + 1] if index + 1 < len(timesteps) else None
            latent = known.mask * known.at(scheduler, following, generator) + (1 - known.mask) * latent
        if on_step is not None:
            on_step(index + 1, len(timesteps))
    return latent
