"""Options that several commands share (the nodule features, guidance, model and device), written once.

Example:
    >>> from lsdm_aug.cli.options import check_generation_options
    >>> check_generation_options(count=10, guidance_scale=1.0, cfg_scale=None, batch_size=1)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lsdm_aug.cli.errors import fail

__all__ = ["Level", "Calcification", "GuidanceScale", "CfgScale", "Steps", "SliceSize", "AppearanceFromOutline",
           "ModelName", "Device", "check_generation_options", "source_text"]

Level = Annotated[str, typer.Option(help="A level 1..5 or a range like 3-5 (spread evenly); omit to leave free.")]
Calcification = Annotated[str, typer.Option(help="LIDC calcification 1..6 (6 absent) or a range; steered by "
                                                 "classifier-free guidance (models conditioned on it).")]
GuidanceScale = Annotated[float, typer.Option(help="Classifier guidance scale s (>= 0).")]
CfgScale = Annotated[float | None, typer.Option(help="Classifier-free guidance scale w (>= 0; default: the model's, "
                                                     "see its model card).")]
Steps = Annotated[int, typer.Option(help="DDIM steps per nodule.")]
SliceSize = Annotated[int, typer.Option(help="Phantom slice size: 64, 128, 256 or 512 (at LIDC spacing).")]
AppearanceFromOutline = Annotated[bool, typer.Option(
    "--appearance-from-outline/--no-appearance-from-outline",
    help="Tell the U-Net the texture and calcification of each outline's real LIDC nodule when they are not "
         "requested (off: it draws its average nodule).")]
ModelName = Annotated[str, typer.Option(help="'default' or a model folder.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:1 ... (default: CUDA when present).")]


def check_generation_options(count: int, guidance_scale: float, cfg_scale: float | None, batch_size: int) -> None:
    """Exit with a one-line error naming the first option out of range (count, scales, batch size)."""
    if count <= 0:
        fail(f"--count must be > 0, got {count}")
    if cfg_scale is not None and cfg_scale < 0:
        fail(f"--cfg-scale must be >= 0, got {cfg_scale}")
    if guidance_scale < 0:
        fail(f"--guidance-scale must be >= 0, got {guidance_scale}")
    if batch_size < 1:
        fail(f"--batch-size must be >= 1, got {batch_size}")


def source_text(source: Path | None) -> str | None:
    """``--from`` as the request stores it: the path as text, or None for new phantom slices."""
    return None if source is None else str(source)
