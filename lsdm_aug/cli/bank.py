"""``lsdm-aug bank``: build a nodule bank for cheap CPU augmentation (the transforms' ``bank=`` mode)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lsdm_aug.cli.errors import user_errors
from lsdm_aug.cli.options import (AppearanceFromOutline, Calcification, CfgScale, Device, GuidanceScale, Level,
                                  ModelName, SliceSize, Steps, check_generation_options, source_text)
from lsdm_aug.cli.synthesize import build_request

app = typer.Typer(help="Nodule banks: pre-generated nodules for the transforms' bank mode.", no_args_is_help=True)


@app.command("build")
def build(
    out: Annotated[Path, typer.Option(help="Bank folder; rerun the same command to continue.")],
    count: Annotated[int, typer.Option(help="Number of nodules (> 0).")] = 500,
    malignancy: Level = "",
    lobulation: Level = "",
    spiculation: Level = "",
    texture: Level = "",
    calcification: Calcification = "",
    balance: Annotated[str, typer.Option(help="Comma-separated features whose levels get equal counts "
                                              "(default: malignancy when no feature is given).")] = "",
    guidance_scale: GuidanceScale = 1.0,
    cfg_scale: CfgScale = None,
    steps: Steps = 25,
    size: SliceSize = 512,
    seed: Annotated[int, typer.Option(help="Master seed: same seed, same bank.")] = 0,
    source: Annotated[Path | None, typer.Option("--from", help="Generate in slices of this prepared or nnU-Net "
                                                              "dataset instead of new phantom slices.")] = None,
    appearance_from_outline: AppearanceFromOutline = True,
    model: ModelName = "default",
    device: Device = "",
    batch_size: Annotated[int, typer.Option(help="Nodules run through the diffusion together.")] = 1,
) -> None:
    """Generate nodules with controlled features once; the transforms place them later (bank=DIR)."""
    check_generation_options(count, guidance_scale, cfg_scale, batch_size)
    from lsdm_aug.synthesis import build_bank

    with user_errors():
        request = build_request(count, {"malignancy": malignancy, "lobulation": lobulation, "spiculation": spiculation,
                                        "texture": texture, "calcification": calcification}, balance,
                                size=size, seed=seed,
                                guidance_scale=guidance_scale, steps=steps, model=model, cfg_scale=cfg_scale,
                                source=source_text(source),
                                appearance_from_outline=appearance_from_outline)
        bank = build_bank(out, request, device or None, batch_size=batch_size, progress=True)
    typer.echo(f"bank {out}: {len(bank)} nodules, {bank.settings['patch_px']} px patches at {bank.spacing_mm:.2f} mm/px")
