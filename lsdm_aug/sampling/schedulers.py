"""MONAI DDPM / DDIM schedulers built from a :class:`~lsdm_aug.config.DiffusionConfig`.

Latents are scaled to unit variance, so predicted samples are not clipped to [-1, 1].

Example:
    >>> from lsdm_aug.config import DiffusionConfig
    >>> scheduler = build_scheduler(DiffusionConfig(), "ddim", steps=50)
    >>> len(scheduler.timesteps)
    50
"""

from __future__ import annotations

from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, Scheduler

from lsdm_aug.config import DiffusionConfig

__all__ = ["SAMPLERS", "build_scheduler", "training_scheduler"]

SAMPLERS = ("ddpm", "ddim")


def _schedule_args(config: DiffusionConfig) -> dict:
    return dict(num_train_timesteps=config.num_train_timesteps, schedule=config.beta_schedule,
                beta_start=config.beta_start, beta_end=config.beta_end, clip_sample=False)


def training_scheduler(config: DiffusionConfig) -> DDPMScheduler:
    """The forward process used in training (``add_noise``), all ``num_train_timesteps`` steps."""
    return DDPMScheduler(**_schedule_args(config))


def build_scheduler(config: DiffusionConfig, sampler: str = "ddim", steps: int | None = None) -> Scheduler:
    """A sampling scheduler: ``"ddpm"`` (ancestral) or ``"ddim"`` (deterministic, eta = 0), with ``steps`` steps.

    Raises:
        ValueError: unknown sampler, or ``steps`` outside 1..num_train_timesteps.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    steps = config.num_train_timesteps if steps is None else steps
    if not 1 <= steps <= config.num_train_timesteps:
        raise ValueError(f"steps must be in 1..{config.num_train_timesteps}, got {steps!r}")
    scheduler = (DDPMScheduler if sampler == "ddpm" else DDIMScheduler)(**_schedule_args(config))
    scheduler.set_timesteps(steps)
    return scheduler
