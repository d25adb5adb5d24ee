"""``lsdm-aug preview``: a picture of a prepared dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lsdm_aug.cli.errors import fail, user_errors


def preview(
    dataset: Annotated[Path, typer.Argument(help="A prepared dataset folder.")],
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("preview.png"),
    count: Annotated[int, typer.Option(help="Number of cases (rows).")] = 6,
    nodules_first: Annotated[bool, typer.Option(help="Show cases with nodules first.")] = True,
    seed: Annotated[int, typer.Option(help="Which cases are picked.")] = 0,
) -> None:
    """Draw image | semantic map | nodule mask for a few cases of a prepared dataset."""
    if count <= 0:
        fail(f"--count must be > 0, got {count}")
    from lsdm_aug.data.preview import preview_grid

    with user_errors():
        path = preview_grid(dataset, out, count=count, nodules_first=nodules_first, seed=seed)
    typer.echo(f"wrote {path}")
