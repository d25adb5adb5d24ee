"""``lsdm-aug synthesize``: write a balanced synthetic nodule dataset in nnU-Net v2's raw format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lsdm_aug.cli.errors import fail, user_errors
from lsdm_aug.cli.options import (AppearanceFromOutline, Calcification, CfgScale, Device, GuidanceScale, Level,
                                  ModelName, SliceSize, Steps, check_generation_options, source_text)


def build_request(count: int, levels: dict[str, str], balance: str, **settings):
    """A checked :class:`~lsdm_aug.synthesis.SynthesisRequest` from the CLI's feature options."""
    from lsdm_aug.synthesis import SynthesisRequest, parse_level_option

    features = {name: parse_level_option(name, text) for name, text in levels.items()}
    request = SynthesisRequest(count=count, features={k: v for k, v in features.items() if v is not None},
                               balance=tuple(b.strip() for b in balance.split(",") if b.strip()), **settings)
    request.balanced_levels()
    return request


def synthesize(
    out: Annotated[Path, typer.Option(help="Output dataset folder (nnU-Net raw layout); rerun to continue.")],
    count: Annotated[int, typer.Option(help="Number of cases (> 0).")] = 100,
    malignancy: Level = "",
    lobulation: Level = "",
    spiculation: Level = "",
    texture: Level = "",
    calcification: Calcification = "",
    balance: Annotated[str, typer.Option(help="Comma-separated features whose levels get equal counts, "
                                              "e.g. malignancy,texture (default: malignancy when no feature is given).")] = "",
    guidance_scale: GuidanceScale = 1.0,
    cfg_scale: CfgScale = None,
    steps: Steps = 25,
    size: SliceSize = 512,
    seed: Annotated[int, typer.Option(help="Master seed: same seed, same dataset.")] = 0,
    nodules_per_slice: Annotated[int, typer.Option(help="Nodules inserted per case.")] = 1,
    source: Annotated[Path | None, typer.Option("--from", help="Insert into this prepared or nnU-Net dataset "
                                                              "instead of new phantom slices.")] = None,
    appearance_from_outline: AppearanceFromOutline = True,
    model: ModelName = "default",
    device: Device = "",
    batch_size: Annotated[int, typer.Option(help="Cases run through the diffusion together (output unchanged).")] = 1,
    ray: Annotated[str, typer.Option("--ray", help="Spread the work over Ray: 'auto' (a running cluster), an "
                                                   "address such as ray://host:10001, or 'local'.")] = "",
    preview: Annotated[Path | None, typer.Option(help="Also draw a PNG grid of samples across the requested "
                                                      "levels.")] = None,
) -> None:
    """Insert nodules with controlled features into CT slices and write a dataset nnU-Net reads as it is."""
    check_generation_options(count, guidance_scale, cfg_scale, batch_size)
    if preview is not None and preview.suffix.lower() != ".png":
        fail(f"--preview must name a .png file, got {str(preview)!r}")
    from lsdm_aug.synthesis import synthesize as run

    with user_errors():
        request = build_request(count, {"malignancy": malignancy, "lobulation": lobulation, "spiculation": spiculation,
                                        "texture": texture, "calcification": calcification}, balance,
                                size=size, seed=seed,
                                guidance_scale=guidance_scale, steps=steps, nodules_per_slice=nodules_per_slice,
                                model=model, cfg_scale=cfg_scale, source=source_text(source),
                                appearance_from_outline=appearance_from_outline)
        manifest = run(out, request, device or None, progress=True, batch_size=batch_size, ray_address=ray or None,
                       preview=preview)
    typer.echo(f"wrote {len(manifest)} cases to {out} (manifest.csv, dataset.json)"
               + (f"; preview {preview}" if preview is not None else ""))
