"""``lsdm-aug train autoencoder|diffusion|classifiers|calibrate``: one command per stage, resumable, torchrun-ready.

Several processes: ``torchrun --nproc_per_node 2 -m lsdm_aug.cli train autoencoder ...`` (gloo on CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lsdm_aug.cli.errors import fail, user_errors
from lsdm_aug.cli.options import Device

app = typer.Typer(help="Train one LSDM stage from a recipe on a prepared dataset (resumes from --out).",
                  no_args_is_help=True)

Recipe = Annotated[str, typer.Option(help="Recipe name (phantom-smoke, phantom-128, lidc-512) or YAML path.")]
Data = Annotated[Path, typer.Option(help="Prepared dataset folder (lsdm-aug prepare ...).")]
Out = Annotated[Path, typer.Option(help="Model folder: weights, configs and resumable state.")]
Seed = Annotated[int, typer.Option(help="Seed of initialisation and sampling.")]


def _check(data: Path, out: Path) -> None:
    if not (data / "dataset.json").is_file():
        fail(f"--data {str(data)!r} is not a prepared dataset (no dataset.json)")
    if out.exists() and not out.is_dir():
        fail(f"--out {str(out)!r} is a file, not a folder")


Steps = Annotated[int | None, typer.Option(help="Training steps (> 0; default: the recipe's).")]
InitFrom = Annotated[str | None, typer.Option(help="Warm start from this model folder or shipped model's weights of "
                                                   "the stage (default: the recipe's init_from).")]


def _train(stage: str, recipe: str, data: Path, out: Path, device: str, seed: int, steps: int | None = None,
           init_from: str | None = None) -> None:
    """Run one stage's training function (imported here so that --help stays instant), with ``steps`` and
    ``init_from`` overriding the recipe's section of the stage."""
    _check(data, out)
    if steps is not None and steps <= 0:
        fail(f"--steps must be > 0, got {steps}")
    import importlib

    from lsdm_aug.config import load_recipe
    from lsdm_aug.models.checkpoint import resolve_model_dir

    train = getattr(importlib.import_module(f"lsdm_aug.training.{stage}"), f"train_{stage}")
    with user_errors():
        loaded = load_recipe(recipe)
        section = getattr(loaded, f"train_{stage}")
        if steps is not None:
            section.steps = steps
        if init_from is not None:
            resolve_model_dir(init_from)  # a missing folder fails here, before the data is loaded
            section.init_from = init_from
        metrics = train(loaded, data, out, device or None, seed)
    if metrics:  # only the main process reports
        typer.echo(f"{stage} in {out}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


@app.command("autoencoder")
def autoencoder(recipe: Recipe, data: Data, out: Out, device: Device = "", seed: Seed = 0, steps: Steps = None,
                init_from: InitFrom = None) -> None:
    """Train the KL autoencoder (L1 + patch-adversarial + KL) on random crops, validated on whole slices."""
    _train("autoencoder", recipe, data, out, device, seed, steps, init_from)


@app.command("diffusion")
def diffusion(recipe: Recipe, data: Data, out: Out, device: Device = "", seed: Seed = 0, steps: Steps = None,
              init_from: InitFrom = None) -> None:
    """Train the SPADE latent diffusion U-Net (needs the autoencoder in --out)."""
    _train("diffusion", recipe, data, out, device, seed, steps, init_from)


@app.command("classifiers")
def classifiers(recipe: Recipe, data: Data, out: Out, device: Device = "", seed: Seed = 0,
                steps: Steps = None) -> None:
    """Train the malignancy / lobulation / spiculation / texture classifiers on decoded noisy crops (needs the autoencoder)."""
    _train("classifiers", recipe, data, out, device, seed, steps)


@app.command("spade-gan")
def spade_gan(recipe: Recipe, data: Data, out: Out, device: Device = "", seed: Seed = 0, steps: Steps = None) -> None:
    """Train the SPADE GAN baseline (map -> slice in one pass) of the generation benchmark."""
    _train("spade_gan", recipe, data, out, device, seed, steps)


@app.command("calibrate")
def calibrate(recipe: Recipe, data: Data, out: Out, device: Device = "", seed: Seed = 0,
              per_level: Annotated[int, typer.Option(help="Nodules drawn per rating level (>= 1).")] = 32) -> None:
    """Calibrate the trained regression classifiers in --out: their mean prediction per rating level and timestep
    on the training split's nodules becomes the guidance target (classifiers trained by this version do it)."""
    _check(data, out)
    if per_level < 1:
        fail(f"--per-level must be >= 1, got {per_level}")
    from lsdm_aug.config import load_recipe
    from lsdm_aug.training.calibration import calibrate_classifiers

    with user_errors():
        tables = calibrate_classifiers(load_recipe(recipe), data, out, device or None, seed, per_level=per_level)
    for feature, table in tables.items():
        at_zero = ", ".join(f"{level:g}: {mean:.2f}" for level, mean in zip(table.levels, table.means[0]))
        typer.echo(f"{feature}: mean prediction at t = 0 by level ({at_zero})")
