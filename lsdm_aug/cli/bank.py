"""``lsdm-aug bank``: build a nodule bank for cheap CPU augmentation (the transforms' ``bank=`` mode)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lsdm_aug.cli.errors import fail, user_errors
from lsdm_aug.cli.synthesize import AppearanceFromOutline, Level, build_request

app = typer.Typer(help="Nodule banks: pre-generated nodules for the transforms' bank mode.", no_args_is_help=True)


@app.command("build")
def build(
    out: Annotated[Path, typer.Option(help="Bank folder; rerun the same command to continue.")],
    count: Annotated[int, typer.Option(help="Number of nodules (> 0).")] = 500,
    malignancy: Level = "",
    lobulation: Level = "",
    spiculation: Level = "",
    texture: Level = "",
    calcification: Annotated[str, typer.Option(help="LIDC calcification 1..6 (6 absent) or a range; steered by "
                                                    "classifier-free guidance (models conditioned on it).")] = "",
    balance: Annotated[str, typer.Option(help="Comma-separated features whose levels get equal counts "
                                              "(default: malignancy when no feature is given).")] = "",
    guidance_scale: Annotated[float, typer.Option(help="Classifier guidance scale s (>= 0).")] = 1.0,
    cfg_scale: Annotated[float | None, typer.Option(help="Classifier-free guidance scale w (>= 0; default: the "
                                                         "model's, see its model card).")] = None,
    steps: Annotated[int, typer.Option(help="DDIM steps per nodule.")] = 25,
    size: Annotated[int, typer.Option(help="Phantom slice size: 64, 128, 256 or 512 (at LIDC spacing).")] = 512,
    seed: Annotated[int, typer.Option(help="Master seed: same seed, same bank.")] = 0,
    source: Annotated[Path | None, typer.Option("--from", help="Generate in slices of this prepared or nnU-Net "
                                                              "dataset instead of new phantom slices.")] = None,
    appearance_from_outline: AppearanceFromOutline = True,
    model: Annotated[str, typer.Option(help="'default' or a model folder.")] = "default",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 ... (default: CUDA when present).")] = "",
    batch_size: Annotated[int, typer.Option(help="Nodules run through the diffusion together.")] = 1,
) -> None:
    """Generate nodules with controlled features once; the transforms place them later (bank=DIR)."""
    if count <= 0:
        fail(f"--count must be > 0, got {count}")
    if cfg_scale is not None and cfg_scale < 0:
        fail(f"--cfg-scale must be >= 0, got {cfg_scale}")
    if batch_size < 1:
        fail(f"--batch-size must be >= 1, got {batch_size}")
    from lsdm_aug.synthesis import build_bank

    with user_errors():
        request = build_request(count, {"malignancy": malignancy, "lobulation": lobulation, "spiculation": spiculation,
                                        "texture": texture, "calcification": calcification}, balance,
                                size=size, seed=seed,
                                guidance_scale=guidance_scale, steps=steps, model=model, cfg_scale=cfg_scale,
                                source=None if source is None else str(source),
                                appearance_from_outline=appearance_from_outline)
        bank = build_bank(out, request, device or None, batch_size=batch_size, progress=True)
    typer.echo(f"bank {out}: {len(bank)} nodules, {bank.settings['patch_px']} px patches at {bank.spacing_mm:.2f} mm/px")
