"""``lsdm-aug synthesize``: write a balanced synthetic nodule dataset in nnU-Net v2's raw format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lsdm_aug.cli.errors import fail, user_errors

Level = Annotated[str, typer.Option(help="A level 1..5 or a range like 3-5 (spread evenly); omit to leave free.")]
AppearanceFromOutline = Annotated[bool, typer.Option(
    "--appearance-from-outline/--no-appearance-from-outline",
    help="Tell the U-Net the texture and calcification of each outline's real LIDC nodule when they are not "
         "requested (off: it draws its average nodule).")]


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
    calcification: Annotated[str, typer.Option(help="LIDC calcification 1..6 (6 absent) or a range; steered by "
                                                    "classifier-free guidance (models conditioned on it).")] = "",
    balance: Annotated[str, typer.Option(help="Comma-separated features whose levels get equal counts, "
                                              "e.g. malignancy,texture (default: malignancy when no feature is given).")] = "",
    guidance_scale: Annotated[float, typer.Option(help="Classifier guidance scale s (>= 0).")] = 1.0,
    cfg_scale: Annotated[float | None, typer.Option(help="Classifier-free guidance scale w (>= 0; default: the "
                                                         "model's, see its model card).")] = None,
    steps: Annotated[int, typer.Option(help="DDIM steps per nodule.")] = 25,
    size: Annotated[int, typer.Option(help="Phantom slice size: 64, 128, 256 or 512 (at LIDC spacing).")] = 512,
    seed: Annotated[int, typer.Option(help="Master seed: same seed, same dataset.")] = 0,
    nodules_per_slice: Annotated[int, typer.Option(help="Nodules inserted per case.")] = 1,
    source: Annotated[Path | None, typer.Option("--from", help="Insert into this prepared or nnU-Net dataset "
                                                              "instead of new phantom slices.")] = None,
    appearance_from_outline: AppearanceFromOutline = True,
    model: Annotated[str, typer.Option(help="'default' or a model folder.")] = "default",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 ... (default: CUDA when present).")] = "",
    batch_size: Annotated[int, typer.Option(help="Cases run through the diffusion together (output unchanged).")] = 1,
    ray: Annotated[str, typer.Option("--ray", help="Spread the work over Ray: 'auto' (a running cluster), an "
                                                   "address such as ray://host:10001, or 'local'.")] = "",
    preview: Annotated[Path | None, typer.Option(help="Also draw a PNG grid of samples across the requested "
                                                      "levels.")] = None,
) -> None:
    """Insert nodules with controlled features into CT slices and write a dataset nnU-Net reads as it is."""
    if count <= 0:
        fail(f"--count must be > 0, got {count}")
    if cfg_scale is not None and cfg_scale < 0:
        fail(f"--cfg-scale must be >= 0, got {cfg_scale}")
    if guidance_scale < 0:
        fail(f"--guidance-scale must be >= 0, got {guidance_scale}")
    if batch_size < 1:
        fail(f"--batch-size must be >= 1, got {batch_size}")
    if preview is not None and preview.suffix.lower() != ".png":
        fail(f"--preview must name a .png file, got {str(preview)!r}")
    from lsdm_aug.synthesis import synthesize as run

    with user_errors():
        request = build_request(count, {"malignancy": malignancy, "lobulation": lobulation, "spiculation": spiculation,
                                        "texture": texture, "calcification": calcification}, balance,
                                size=size, seed=seed,
                                guidance_scale=guidance_scale, steps=steps, nodules_per_slice=nodules_per_slice,
                                model=model, cfg_scale=cfg_scale, source=None if source is None else str(source),
                                appearance_from_outline=appearance_from_outline)
        manifest = run(out, request, device or None, progress=True, batch_size=batch_size, ray_address=ray or None,
                       preview=preview)
    typer.echo(f"wrote {len(manifest)} cases to {out} (manifest.csv, dataset.json)"
               + (f"; preview {preview}" if preview is not None else ""))
